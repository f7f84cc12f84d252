"""Rotary position embeddings (RoPE) with the scaling variants of HF configs: linear, dynamic, llama3, yarn.

cos/sin are computed from explicit per-token positions (B, T), so every batch row may sit at its own offset.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from modelcore.errors import UnknownArchitectureError


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/dim), float32 on CPU."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, cfg: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency-dependent scaling: long wavelengths divided by factor, short kept, smooth in between."""
    factor = float(cfg["factor"])
    low = float(cfg.get("low_freq_factor", 1.0))
    high = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, cfg: dict[str, Any], max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: blend interpolated and extrapolated frequencies by a linear ramp; returns (inv_freq, attention factor)."""
    factor = float(cfg["factor"])
    orig = int(cfg.get("original_max_position_embeddings") or max_pos)
    beta_fast = float(cfg.get("beta_fast") or 32)
    beta_slow = float(cfg.get("beta_slow") or 1)
    mscale, mscale_all_dim = cfg.get("mscale"), cfg.get("mscale_all_dim")

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = cfg.get("attention_factor")
    if attn_factor is None:
        if mscale and mscale_all_dim:
            attn_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attn_factor = get_mscale(factor)

    def correction_dim(n_rot: float) -> float:
        return (dim * math.log(orig / (n_rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if cfg.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    inv_freq = inv_inter * (1 - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    """Computes (cos, sin) of shape (B, T, dim) for given positions; supports HF rope_scaling variants."""

    def __init__(self, dim: int, theta: float, max_position_embeddings: int, scaling: dict[str, Any] | None = None):
        super().__init__()
        self.dim, self.theta, self.max_pos = dim, float(theta), max_position_embeddings
        cfg = dict(scaling or {})
        self.kind = cfg.get("rope_type", cfg.get("type", "default")) or "default"
        self.cfg = cfg
        self.attention_factor = 1.0
        with torch.device("cpu"):  # also when the model is being built on 'meta'
            inv = self._init_inv_freq(dim, max_position_embeddings, cfg)
        # plain attribute, not a buffer: stays float32 on CPU even when the module is built on 'meta' or cast to bf16
        self.inv_freq = inv.to(dtype=torch.float32)
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def table(self, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos, sin (max_pos, dim) for every position, built once per (device, dtype); None for dynamic NTK scaling.

        Same float32 maths as forward (positions * inv_freq, then cos/sin, times attention_factor), so a row lookup
        equals the computed value exactly; decoding then needs one gather instead of five ops and a host-to-device copy.
        """
        if self.kind == "dynamic":
            return None
        key = (torch.device(device), dtype)
        tab = self._tables.get(key)
        if tab is None:
            with torch.device("cpu"):
                freqs = torch.arange(self.max_pos, dtype=torch.float32)[:, None] * self.inv_freq.cpu()  # (P, dim/2)
                emb = torch.cat((freqs, freqs), dim=-1)  # (P, dim)
                cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
            tab = (cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype))
            self._tables[key] = tab
        return tab

    def _init_inv_freq(self, dim: int, max_position_embeddings: int, cfg: dict[str, Any]) -> torch.Tensor:
        """Inverse frequencies of this scaling variant (sets attention_factor for yarn)."""
        base = _default_inv_freq(dim, self.theta)
        if self.kind == "default":
            inv = base
        elif self.kind == "linear":
            inv = base / float(cfg["factor"])
        elif self.kind == "dynamic":
            inv = base
        elif self.kind == "llama3":
            inv = _llama3_inv_freq(base, cfg)
        elif self.kind == "yarn":
            inv, self.attention_factor = _yarn(dim, self.theta, cfg, max_position_embeddings)
        else:
            raise UnknownArchitectureError(f"unsupported rope_scaling type {self.kind!r} (supported: linear, dynamic, llama3, yarn)")
        return inv

    def _inv_freq_for(self, positions: torch.Tensor) -> torch.Tensor:
        """Inverse frequencies for this call (dynamic NTK grows the base past the original context)."""
        if self.kind != "dynamic":
            return self.inv_freq
        seq_len = int(positions.max()) + 1
        orig = int(self.cfg.get("original_max_position_embeddings") or self.max_pos)
        if seq_len <= orig:
            return self.inv_freq
        factor = float(self.cfg["factor"])
        base = self.theta * ((factor * seq_len / orig) - (factor - 1)) ** (self.dim / (self.dim - 2))
        return _default_inv_freq(self.dim, base)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin each (B, T, dim) in `dtype`, computed in float32 (or looked up in `table`)."""
        tab = self.table(positions.device, dtype) if positions.device.type != "meta" else None
        if tab is not None:
            return tab[0][positions], tab[1][positions]  # (B, T, dim) each
        inv = self._inv_freq_for(positions).to(positions.device)
        freqs = positions[..., None].float() * inv  # (B, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, dim)
        cos, sin = emb.cos() * self.attention_factor, emb.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the last dimension split in halves."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x (B, H, T, D) by cos/sin (B, T, D); `interleaved` pairs channels (0,1),(2,3) as in DeepSeek's originals."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
    if interleaved:
        b, h, t, d = x.shape
        x = x.view(b, h, t, d // 2, 2).transpose(-1, -2).reshape(b, h, t, d)  # de-interleave to halves
        out = x * cos + rotate_half(x) * sin
        return out.view(b, h, t, 2, d // 2).transpose(-1, -2).reshape(b, h, t, d)
    return x * cos + rotate_half(x) * sin
