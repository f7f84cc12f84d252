"""Weight-only quantization: int8 per output channel, int4 group-wise asymmetric (groups of 32/64/128).

A pair, as in gpt-fast: `quantize_int8` / `quantize_int4` build the quantized weights, `Int8Linear` /
`Int4Linear` (and the embedding twins) replace the float modules; `quantize_model` swaps them in.

Kernels. On CPU PyTorch ships packed weight-only kernels that are fast only for bfloat16 activations
(float32 inputs take a slow path in torch 2.13): `aten._weight_int8pack_mm(x, w_int8 (N,K), scales (N,))` and
`aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros (K/g, N, 2))` with the weight packed by
`aten._convert_weight_to_int4pack_for_cpu(codes int32 (N,K), 1)`. On CUDA: `_weight_int4pack_mm` after
`_convert_weight_to_int4pack(uint8 (N, K/2) high-nibble-first, inner_k_tiles)`. The int4 kernels dequantize
`(code - 8) * scale + zero`, so our asymmetric `code * scale + min` maps to `zero = min + 8 * scale`.
kernel="packed" runs the matmul in bfloat16 and returns the input's dtype; kernel="fallback" dequantizes
into the input's dtype and calls `F.linear` (the naive twin the tests check the packed path against).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "packed", "fallback")


@dataclass
class Int4Weights:
    """Asymmetric int4 weights: w[n, k] = codes[n, k] * scales[n, k // g] + mins[n, k // g]."""

    codes: torch.Tensor  # (N, K) uint8 in 0..15
    scales: torch.Tensor  # (N, K / g) float32
    mins: torch.Tensor  # (N, K / g) float32
    group_size: int

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Int4Weights":
        """Apply the same row permutation `fn` to codes, scales and mins."""
        return Int4Weights(fn(self.codes), fn(self.scales), fn(self.mins), self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group_size
        w = self.codes.view(n, k // g, g).to(dtype) * self.scales[..., None].to(dtype) + self.mins[..., None].to(dtype)
        return w.view(n, k)  # (N, K)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 (N,K), scales float32 (N,)), w ≈ q * scales[:, None]."""
    w = w.detach().float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(w: torch.Tensor, *, group_size: int = 32) -> Int4Weights:
    """Asymmetric group-wise int4 (min/max per group of `group_size` input columns)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    wg = w.detach().float().view(n, k // group_size, group_size)  # (N, G, g)
    mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((mx - mn) / 15.0).clamp(min=1e-10)
    codes = torch.round((wg - mn[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
    return Int4Weights(codes.view(n, k), scales, mn, group_size)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes -> (N, K/2) bytes, element 2i in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


def _bf16_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The packed kernels' input: bfloat16, contiguous (skips the no-op dispatches on the decode hot path)."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return x if x.is_contiguous() else x.contiguous()


def _resolve_kernel(kernel: str, device: torch.device) -> str:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return "packed" if kernel == "auto" and device.type in ("cpu", "cuda") else kernel


class Int8Linear(nn.Module):
    """nn.Linear with int8 per-output-channel weights."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = _resolve_kernel(kernel, q.device)
        self.register_buffer("weight", q.contiguous())
        dt = torch.bfloat16 if self.kernel == "packed" else torch.float32
        self.register_buffer("scales", scales.to(dt).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, kernel: str = "auto") -> "Int8Linear":
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "packed":
            y = torch.ops.aten._weight_int8pack_mm(_bf16_contiguous(x2), self.weight, self.scales)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            y = F.linear(x2, w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """nn.Linear with asymmetric group-wise int4 weights."""

    def __init__(self, qw: Int4Weights, bias: torch.Tensor | None, *, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qw.codes.shape
        self.group_size = qw.group_size
        self.kernel = _resolve_kernel(kernel, qw.codes.device)
        if self.kernel == "packed":
            self._build_packed(qw)
        else:
            self.register_buffer("codes", _pack_nibbles(qw.codes))  # (N, K/2)
            self.register_buffer("scales", qw.scales.float().contiguous())  # (N, G)
            self.register_buffer("mins", qw.mins.float().contiguous())  # (N, G)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _build_packed(self, qw: Int4Weights) -> None:
        zeros = qw.mins.float() + 8.0 * qw.scales.float()
        sz = torch.stack([qw.scales.float(), zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())
        if qw.codes.device.type == "cuda":
            hi_first = ((qw.codes[:, 0::2] << 4) | qw.codes[:, 1::2]).contiguous()  # (N, K/2)
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack(hi_first, 8))
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes.to(torch.int32), 1))

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, group_size: int = 32, kernel: str = "auto") -> "Int4Linear":
        return cls(quantize_int4(lin.weight, group_size=group_size), lin.bias, kernel=kernel)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Float weight (N, K) of the fallback layout."""
        assert self.kernel == "fallback", "dequantized_weight needs the fallback layout"
        qw = Int4Weights(_unpack_nibbles(self.codes), self.scales, self.mins, self.group_size)
        return qw.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "packed":
            xb = _bf16_contiguous(x2)
            if self.packed.device.type == "cuda":
                y = torch.ops.aten._weight_int4pack_mm(xb, self.packed, self.group_size, self.scales_and_zeros)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_and_zeros)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        else:
            y = F.linear(x2, self.dequantized_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group={self.group_size}, kernel={self.kernel}"


class Int8Embedding(nn.Module):
    """nn.Embedding with int8 per-row weights (a gather, then one multiply)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, *, quantized: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__()
        q, s = quantized if quantized is not None else quantize_int8(weight)
        self.num_embeddings, self.embedding_dim = q.shape
        self.out_dtype = dtype
        self.register_buffer("weight", q)
        self.register_buffer("scales", s)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return (self.weight[ids].to(torch.float32) * self.scales[ids][..., None]).to(self.out_dtype)


class Int4Embedding(nn.Module):
    """nn.Embedding with group-wise int4 rows (gather packed rows, unpack, scale)."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype, *, group_size: int = 32) -> None:
        super().__init__()
        qw = quantize_int4(weight, group_size=group_size)
        self.num_embeddings, self.embedding_dim = qw.codes.shape
        self.group_size, self.out_dtype = group_size, dtype
        self.register_buffer("codes", _pack_nibbles(qw.codes))
        self.register_buffer("scales", qw.scales)
        self.register_buffer("mins", qw.mins)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = _unpack_nibbles(self.codes[ids]).float()  # (..., D)
        g = self.group_size
        c = codes.unflatten(-1, (self.embedding_dim // g, g))  # (..., G, g)
        w = c * self.scales[ids][..., None] + self.mins[ids][..., None]
        return w.flatten(-2).to(self.out_dtype)


def quantize_model(
    model: nn.Module,
    mode: str | None,
    *,
    group_size: int = 32,
    kernel: str = "auto",
    prequantized: Mapping[str, Int4Weights] | None = None,
    quantize_embeddings: bool = True,
) -> nn.Module:
    """Swap every nn.Linear (and nn.Embedding when `quantize_embeddings`) for its quantized twin, in place.

    Embeddings become int8 per row in both modes (GGUF files keep them at Q8_0 too); an output head tied to
    them becomes an Int8Linear over the SAME int8 tensor, so tied weights stay stored once.
    `prequantized` maps `"{linear}.weight"` to ready int4 codes (from a Q4_0/Q4_1 GGUF tensor); those linears
    may still hold meta weights. Returns `model`.
    """
    if mode is None:
        return model
    if mode not in MODES:
        raise ValueError(f"quantization must be None, 'int8' or 'int4', got {mode!r}")
    prequantized = dict(prequantized or {})
    int8_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(float embedding weight) -> (q, scales)
    if quantize_embeddings:
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if isinstance(child, nn.Embedding):
                    qs = int8_of.setdefault(id(child.weight), quantize_int8(child.weight))
                    setattr(parent, child_name, Int8Embedding(child.weight, child.weight.dtype, quantized=qs))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear):
                continue
            pre = prequantized.pop(f"{full}.weight", None)
            tied = int8_of.get(id(child.weight))
            if tied is not None:
                new: nn.Module = Int8Linear(tied[0], tied[1], child.bias, kernel=kernel)
            elif mode == "int8":
                new = Int8Linear.from_linear(child, kernel=kernel)
            elif pre is not None and pre.group_size == group_size:
                new = Int4Linear(pre, child.bias, kernel=kernel)
            else:
                lin = child if pre is None else _float_linear(pre, child.bias)
                new = Int4Linear.from_linear(lin, group_size=group_size, kernel=kernel)
            setattr(parent, child_name, new)
    if prequantized:
        raise ValueError(f"prequantized weights for unknown linears: {sorted(prequantized)[:5]}")
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None}
    return model


def _float_linear(qw: Int4Weights, bias: torch.Tensor | None) -> nn.Linear:
    n, k = qw.codes.shape
    lin = nn.Linear(k, n, bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(qw.dequantize())
        if bias is not None:
            lin.bias.copy_(bias)
    return lin


def quantized_nbytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "meta" or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
