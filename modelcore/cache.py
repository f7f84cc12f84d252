"""KV cache: fixed-size per-layer buffers written at per-row positions.

API (shared by every attention variant, GQA here and MLA in modelcore/mla.py):

* ``layer_cache = attention.new_cache(batch, max_len, device, dtype)`` allocates one layer's buffers;
  ``Transformer.new_cache(batch, max_len)`` returns the list of them for all layers.
* The slot of a token in the cache equals its position: row ``b``'s token at position ``p`` is written to
  slot ``p`` of row ``b``.  Rows are independent, so rows may be at different lengths (batched prompts of
  different lengths, or Engine request slots).  Starting a new request in a row needs no reset: its prefill
  overwrites slots 0..n-1 and the causal mask (key slot <= query position) hides stale slots beyond.
* ``KVCache.update(positions (B,T), k (B,Hkv,T,D), v (B,Hkv,T,D))`` writes and returns the full buffers
  ``(B,Hkv,max_len,D)``; the attention slices them to the mask's key length ``S``.
* ``KVCache.select_rows(rows)`` / ``copy_row(src, dst)`` help callers that rearrange slots.
"""
from __future__ import annotations

import torch


class KVCache:
    """One layer's key/value buffers of shape (B, H_kv, max_len, D)."""

    def __init__(self, batch: int, max_len: int, n_kv_heads: int, head_dim: int, device: torch.device | str, dtype: torch.dtype,
                 v_head_dim: int | None = None):
        self.max_len = max_len
        self.k = torch.zeros(batch, n_kv_heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros(batch, n_kv_heads, max_len, v_head_dim or head_dim, device=device, dtype=dtype)

    @property
    def batch(self) -> int:
        """Number of rows (request slots)."""
        return self.k.shape[0]

    def update(self, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v (B, H, T, D) at slots `positions` (B, T); return the whole buffers."""
        b, h, t, _ = k.shape
        assert positions.shape == (b, t), f"positions {tuple(positions.shape)} != {(b, t)}"
        k, v = k.to(self.k.dtype), v.to(self.v.dtype)  # the cache may be kept in float32 under bf16 activations
        if t > 1 and bool((positions[:, 1:] - positions[:, :-1] == 1).all()):  # prefill: contiguous runs
            start = positions[:, 0]
            if bool((start == start[0]).all()) and b == self.batch:  # same offset everywhere: one slice copy
                s0 = int(start[0])
                self.k[:, :, s0:s0 + t] = k
                self.v[:, :, s0:s0 + t] = v
                return self.k, self.v
        if t == 1 and b == 1 and k.device.type == "cpu":  # CPU decode of one row: reading the position is free
            p = int(positions[0, 0])
            self.k[0, :, p] = k[0, :, 0]
            self.v[0, :, p] = v[0, :, 0]
            return self.k, self.v
        # decode (t == 1) and ragged rows: a scatter at the positions; no host read, so CUDA graphs can capture it
        idx_k = positions[:, None, :, None].expand(b, h, t, self.k.shape[-1])  # (B, H, T, D)
        idx_v = positions[:, None, :, None].expand(b, h, t, self.v.shape[-1])
        self.k[:b].scatter_(2, idx_k, k)
        self.v[:b].scatter_(2, idx_v, v)
        return self.k, self.v

    def write_prefix(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k/v (B, H, T, D) at slots 0..T-1 of rows 0..B-1 (an unpadded prompt): no position checks, no host reads."""
        b, _, t, _ = k.shape
        self.k[:b, :, :t] = k
        self.v[:b, :, :t] = v

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (in that order), e.g. after finished requests leave a batch."""
        self.k, self.v = self.k[rows], self.v[rows]

    def copy_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy the cached keys/values of row `src` into row `dst` (slots 0..length-1; default all)."""
        n = self.max_len if length is None else length
        self.k[dst, :, :n].copy_(self.k[src, :, :n])
        self.v[dst, :, :n].copy_(self.v[src, :, :n])
