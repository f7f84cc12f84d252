"""Multi-head Latent Attention (DeepSeek-V2/V3) with a compressed cache and the weight-absorbed decode.

Per token and layer the cache keeps only the normalised KV latent (kv_lora_rank values) and the shared rotary
key (qk_rope_head_dim values): 512 + 64 = 576 at DeepSeek-V3 sizes, instead of 2 * n_heads * head_dim.

Two ways to attend over that cache, checked against each other in tests/modelcore/test_mla_moe_units.py:

* naive   - expand the latent through kv_b_proj into per-head keys/values (the reference formulation);
* absorb  - fold kv_b_proj's key half into the query and its value half into the output, so attention runs
            directly on the latent (what decoding uses: no per-step expansion of the whole cache).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.args import ModelArgs
from modelcore.model import RMSNorm
from modelcore.rope import RotaryEmbedding, apply_rotary


def mla_softmax_scale(args: ModelArgs) -> float:
    """qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek's long-context correction)."""
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    cfg = args.rope_scaling or {}
    kind = cfg.get("rope_type", cfg.get("type", "default")) or "default"
    mscale_all_dim = cfg.get("mscale_all_dim") or 0
    factor = float(cfg.get("factor") or 1.0)
    if kind != "default" and mscale_all_dim and factor > 1:
        m = 0.1 * float(mscale_all_dim) * math.log(factor) + 1.0
        scale *= m * m
    return scale


class LatentCache:
    """One MLA layer's cache: buffer (B, 1, max_len, kv_lora_rank + qk_rope_head_dim), slot = token position.

    Same API as modelcore.cache.KVCache (update / select_rows / copy_row / max_len / batch).
    """

    def __init__(self, batch: int, max_len: int, kv_lora_rank: int, rope_dim: int, device: torch.device | str,
                 dtype: torch.dtype):
        self.max_len = max_len
        self.kv_lora_rank = kv_lora_rank
        self.kv = torch.zeros(batch, 1, max_len, kv_lora_rank + rope_dim, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        """Number of rows (request slots)."""
        return self.kv.shape[0]

    def update(self, positions: torch.Tensor, entry: torch.Tensor) -> torch.Tensor:
        """Write entry (B, 1, T, r + dr) at slots `positions` (B, T); return the whole buffer."""
        b, _, t, d = entry.shape
        assert positions.shape == (b, t), f"positions {tuple(positions.shape)} != {(b, t)}"
        idx = positions[:, None, :, None].expand(b, 1, t, d)  # (B, 1, T, r + dr)
        self.kv[:b].scatter_(2, idx, entry.to(self.kv.dtype))
        return self.kv

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order)."""
        self.kv = self.kv[rows]

    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row `src`'s cached latents into row `dst` (slots 0..length-1; default all)."""
        n = self.max_len if length is None else length
        self.kv[dst, :, :n].copy_(self.kv[src, :, :n])


class MLA(nn.Module):
    """Multi-head Latent Attention; attribute names match HF DeepseekV2/V3 checkpoint keys."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads = args.n_heads
        self.q_lora_rank = args.q_lora_rank
        self.kv_lora_rank = args.kv_lora_rank
        self.qk_nope_head_dim = args.qk_nope_head_dim
        self.qk_rope_head_dim = args.qk_rope_head_dim
        self.qk_head_dim = args.qk_nope_head_dim + args.qk_rope_head_dim
        self.v_head_dim = args.v_head_dim
        self.scale = mla_softmax_scale(args)
        self.interleave = bool(args.extra.get("rope_interleave", True))
        self.impl = "auto"  # "auto" (naive for T > 1, absorb for T == 1) | "naive" | "absorb"
        self.naive = False  # Transformer.set_naive_attention: explicit softmax instead of SDPA
        h, dim = args.n_heads, args.dim
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(dim, self.q_lora_rank, bias=args.attention_bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)  # HF uses the default eps here
            self.q_b_proj = nn.Linear(self.q_lora_rank, h * self.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(dim, h * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, self.kv_lora_rank + self.qk_rope_head_dim, bias=args.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, h * (self.qk_nope_head_dim + self.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_head_dim, dim, bias=args.attention_bias)
        self.rotary = RotaryEmbedding(self.qk_rope_head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling)
        self._kv_b_float: torch.Tensor | None = None  # dequantised kv_b_proj weight, when a quantized module is swapped in

    def new_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> LatentCache:
        """Allocate this layer's compressed cache (kv_lora_rank + qk_rope_head_dim values per token)."""
        return LatentCache(batch, max_len, self.kv_lora_rank, self.qk_rope_head_dim, device, dtype)

    def _kv_b_weight(self) -> torch.Tensor:
        """kv_b_proj's float weight (H*(dn+dv), r); for a swapped-in quantized module, its dequantised weight."""
        w = getattr(self.kv_b_proj, "weight", None)
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            return w
        cached = self._kv_b_float
        if cached is None or cached.device != self.kv_a_layernorm.weight.device:
            deq = getattr(self.kv_b_proj, "dequantize", None)
            if callable(deq):
                cached = deq()
            else:  # any linear map: its weight is its response to the identity (once; quantized weights are frozen)
                eye = torch.eye(self.kv_lora_rank, device=self.kv_a_layernorm.weight.device,
                                dtype=self.kv_a_layernorm.weight.dtype)
                with torch.no_grad():
                    cached = self.kv_b_proj(eye).T.contiguous()  # (H*(dn+dv), r)
            self._kv_b_float = cached
        return cached

    def _queries_and_entry(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q_nope (B,H,T,dn), rotated q_pe (B,H,T,dr), cache entry (B,1,T,r+dr) = [norm(latent), rotated k_pe]."""
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(b, t, self.n_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, T, dn + dr)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)  # (B, T, r)
        cos, sin = self.rotary(positions, x.dtype)
        if self.interleave:  # rotary pairs (0,1),(2,3),..: cos/sin hold each pair's angle twice
            cos, sin = cos[..., : cos.shape[-1] // 2], sin[..., : sin.shape[-1] // 2]
            q_pe, k_pe = _rotate_pairs(q_pe, cos, sin), _rotate_pairs(k_pe[:, None], cos, sin)
        else:
            q_pe, k_pe = apply_rotary(q_pe, cos, sin), apply_rotary(k_pe[:, None], cos, sin)
        entry = torch.cat([latent[:, None], k_pe], dim=-1)  # (B, 1, T, r + dr)
        return q_nope, q_pe, entry

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LatentCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B,T,D), positions (B,T), boolean mask (B,1,T,S) (True = may attend) -> (B,T,D)."""
        b, t, _ = x.shape
        q_nope, q_pe, entry = self._queries_and_entry(x, positions)
        if cache is not None:
            kv = cache.update(positions, entry)
            s = mask.shape[-1] if mask is not None else int(positions.max()) + 1
            entry = kv[:b, :, :s]  # (B, 1, S, r + dr)
        if mask is None and t > 1:
            s = entry.shape[2]
            mask = torch.ones(t, s, dtype=torch.bool, device=x.device).tril(s - t)[None, None]  # causal (1,1,T,S)
        absorb = self.impl == "absorb" or (self.impl == "auto" and t == 1)
        out = self._absorbed(q_nope, q_pe, entry, mask) if absorb else self._expanded(q_nope, q_pe, entry, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.v_head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """SDPA (or the explicit-softmax reference when self.naive) with this layer's softmax scale."""
        if self.naive:
            scores = (q @ k.transpose(-1, -2)).float() * self.scale  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            return scores.softmax(-1).to(q.dtype) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entry: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Naive form: per-head K/V from the latent through kv_b_proj. Returns (B, H, T, dv)."""
        b, _, s, _ = entry.shape
        latent, k_pe = entry[:, 0].split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)  # (B,S,r), (B,S,dr)
        kv = self.kv_b_proj(latent).view(b, s, self.n_heads, self.qk_nope_head_dim + self.v_head_dim).transpose(1, 2)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)  # (B,H,S,dn), (B,H,S,dv)
        k = torch.cat([k_nope, k_pe[:, None].expand(b, self.n_heads, s, self.qk_rope_head_dim)], dim=-1)  # (B,H,S,dn+dr)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, H, T, dn + dr)
        return self._attend(q, k, v.contiguous(), mask)

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, entry: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Absorbed form: attention over the latent itself; kv_b_proj folded into query and output. (B, H, T, dv).

        All heads share one key/value (the cache entry), so scores are one batched matmul of (H*T) query rows.
        """
        b, h, t, _ = q_nope.shape
        s = entry.shape[2]
        w = self._kv_b_weight().view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]  # (H,dn,r), (H,dv,r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk.to(q_nope.dtype))  # (B, H, T, r)
        q = torch.cat([q_lat, q_pe], dim=-1).reshape(b, h * t, -1)  # (B, H*T, r + dr)
        kv = entry[:, 0]  # (B, S, r + dr)
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.scale  # (B, H*T, S)
        if mask is not None:
            scores = scores.view(b, h, t, s).masked_fill(~mask, float("-inf")).view(b, h * t, s)
        probs = scores.softmax(-1).to(kv.dtype)
        o_lat = torch.bmm(probs, kv[..., : self.kv_lora_rank]).view(b, h, t, self.kv_lora_rank)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", o_lat, w_uv.to(o_lat.dtype))  # (B, H, T, dv)


def _rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x (B,H,T,dr) by cos/sin (B,T,dr/2); layout stays interleaved."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dr/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)  # (B, H, T, dr)
