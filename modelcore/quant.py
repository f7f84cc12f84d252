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
Both kernels take bfloat16 scales, so `quantize_int8` and `quantize_int4(refine=True)` make bfloat16-representable
scales (and zeros): the packed path then differs from the fallback only by the bf16 rounding of activations in
and out. (Q4_1 codes from a GGUF keep their float16 scale/min; the packed int4 kernel rounds those to bf16.)
`cat_linears` fuses quantized linears along out_features (q/k/v, gate/up) without touching their codes.

Size. Group-32 int4 costs 4 bits + a bf16 scale and zero per 32 weights = 5 bits, 0.3125x bf16 (the same as the
Q4_1 format itself). So with a GGUF's Q4_1 codes kept as they are, the whole model cannot go below ~0.31x bf16:
SmolLM2-135M int4 is 0.353x with the tied 49152x576 embedding/head int8, 0.313x with it int4 (embeddings="int4");
0.288x needs group-64 linears re-quantized from the Q4_1 values: +30.4% perplexity on SmolLM2 (perplexity.json).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from modelcore import cpu_int4, triton_int4

MODES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
KERNELS = ("auto", "packed", "fallback", "native")  # "native": our own CPU int4 kernel (modelcore/cpu_int4.py)


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


def _bf16_ceil(x: torch.Tensor) -> torch.Tensor:
    """The smallest bfloat16-representable float32 values >= x (x > 0)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    if bool(low.any()):  # positive bf16: the next value up is the next bit pattern
        b = torch.where(low, (b.view(torch.int16) + 1).view(torch.bfloat16), b)
    return b.float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: returns (q int8 (N,K), scales float32 (N,)), w ≈ q * scales[:, None].

    The scales are bfloat16-representable (max|w|/127 rounded up), so the packed kernel, which takes its scales
    in bfloat16, computes with exactly the scales the codes were made for: rounding float32 scales to bfloat16
    afterwards is a systematic per-channel gain error of up to 0.4% (SmolLM2, 2k tokens: +0.68% -> +0.07% perplexity).
    """
    w = w.detach()
    n = w.shape[0]
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    scales = torch.empty(n, dtype=torch.float32, device=w.device)
    for i in range(0, n, 4096):  # row chunks: float temporaries stay small for a 49152-row embedding
        wc = w[i:i + 4096].float()
        sc = _bf16_ceil((wc.abs().amax(dim=1) / 127.0).clamp(min=1e-10))
        q[i:i + 4096] = torch.round(wc / sc[:, None]).clamp_(-127, 127)
        scales[i:i + 4096] = sc
    return q, scales


def quantize_int4(w: torch.Tensor, *, group_size: int = 32, refine: bool = False, col_weights: torch.Tensor | None = None,
                  chunk_rows: int = 4096) -> Int4Weights:
    """Asymmetric group-wise int4. Default: min/max per group of `group_size` input columns (round to nearest).

    refine=True: per group, try 20 step sizes around (max-min)/15, fit scale and min to the resulting codes by
    (weighted) least squares, keep the fit with the lowest (weighted) squared error (the idea of llama.cpp's
    k-quant search, written here for torch). `col_weights` (K,) weights each input column's error, e.g. the
    mean square of the activations that multiply it. The returned scales and zeros (min + 8 * scale) are
    bfloat16-representable, so the packed kernels (bf16 scales_and_zeros) compute with exactly these weights.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of group_size {group_size}")
    if not refine:
        wg = w.detach().float().view(n, k // group_size, group_size)  # (N, G, g)
        mn, mx = wg.amin(dim=-1), wg.amax(dim=-1)
        scales = ((mx - mn) / 15.0).clamp(min=1e-10)
        codes = torch.round((wg - mn[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8)
        return Int4Weights(codes.view(n, k), scales, mn, group_size)
    cw = torch.ones(k) if col_weights is None else col_weights.detach().float().clamp(min=1e-12)
    parts = [_refine_int4(w[i:i + chunk_rows].detach().float(), group_size, cw.view(k // group_size, group_size))
             for i in range(0, n, chunk_rows)]
    return Int4Weights(*(torch.cat([p_[j] for p_ in parts]) for j in range(3)), group_size)


def _refine_int4(w: torch.Tensor, g: int, cw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Search + weighted least-squares fit of (scale, min) per group; bf16-exact scale and zero. w (R, K)."""
    r, k = w.shape
    wg = w.view(r, k // g, g)  # (R, G, g)
    c_w = cw[None]  # (1, G, g)
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    rng = (mx - mn).clamp(min=1e-10)
    best_err = torch.full(mn.shape, float("inf"))
    best_s, best_m = rng / 15.0, mn.clone()
    sw = c_w.sum(-1, keepdim=True)
    swx = (c_w * wg).sum(-1, keepdim=True)
    for steps in torch.arange(13.0, 18.01, 0.25).tolist():  # 20 candidate step counts over the range
        q = torch.round((wg - mn) * (steps / rng)).clamp(0, 15)
        swq, swqq, swqx = (c_w * q).sum(-1, keepdim=True), (c_w * q * q).sum(-1, keepdim=True), (c_w * q * wg).sum(-1, keepdim=True)
        det = sw * swqq - swq * swq
        s = torch.where(det > 0, (sw * swqx - swq * swx) / det.clamp(min=1e-30), rng / 15.0)
        m = torch.where(det > 0, (swqq * swx - swq * swqx) / det.clamp(min=1e-30), mn)
        s = s.clamp(min=1e-10)
        err = (c_w * (q * s + m - wg) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    s = best_s.to(torch.bfloat16).float().clamp(min=2.0 ** -126)
    zero = (best_m + 8.0 * s).to(torch.bfloat16).float()
    m = zero - 8.0 * s
    codes = torch.round((wg - m) / s).clamp(0, 15)
    return codes.to(torch.uint8).view(r, k), s[..., 0], m[..., 0]


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes -> (N, K/2) bytes, element 2i in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) bytes -> (..., K) codes."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).flatten(-2)


@functools.lru_cache(maxsize=None)
def cpu_int4_block_rows() -> int | None:
    """Rows per block of `aten._convert_weight_to_int4pack_for_cpu`'s layout (None: not a layout we know).

    Probed, not assumed: in torch 2.13 the packed (N, K/2) bytes are blocks of 64 rows; within a block, for each
    input column k, 32 bytes whose low nibble is row j and high nibble row j + 32. Knowing it lets a tied
    embedding gather rows straight from the head's packed weight, and lets packed linears be concatenated.
    """
    n, k = 256, 64
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for rows in (64, 32, 16, 128, 256):
        if packed.shape == (n, k // 2) and torch.equal(_cpu_pack(codes.to(torch.uint8), rows), packed):
            return rows
    return None


def _cpu_pack(codes: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, K) uint8 codes -> the CPU int4 kernel's blocked (N, K/2) layout with `rows` rows per block."""
    n, k = codes.shape
    c = codes.view(n // rows, 2, rows // 2, k)  # (blocks, low/high half, row in half, K)
    return (c[:, 0] | (c[:, 1] << 4)).transpose(1, 2).contiguous().view(n, k // 2)


def _cpu_unpack_rows(packed: torch.Tensor, ids: torch.Tensor, k: int, rows: int) -> torch.Tensor:
    """Codes (len(ids), K) uint8 of rows `ids` (1-D) of a blocked CPU int4 weight."""
    half = rows // 2
    p3 = packed.view(-1, k, half)  # (blocks, K, half)
    r = ids % rows
    b = p3[(ids // rows)[:, None], torch.arange(k, device=ids.device)[None, :], (r % half)[:, None]]  # (T, K)
    return torch.where((r < half)[:, None], b & 0x0F, b >> 4)


def _bf16_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The packed kernels' input: bfloat16, contiguous (skips the no-op dispatches on the decode hot path)."""
    if x.dtype != torch.bfloat16:
        x = x.to(torch.bfloat16)
    return x if x.is_contiguous() else x.contiguous()


def _resolve_kernel(kernel: str, device: torch.device, *, int8_in_features: int | None = None,
                    int4_shape: tuple[int, int, int] | None = None) -> str:
    """'auto' -> 'native' for a CPU int4 weight our own kernel takes (when it builds here), else 'packed' on CPU/CUDA,
    else 'fallback'. `int4_shape` = (out_features, in_features, group_size) of an int4 weight; "native" is int4-only.

    CPU `_weight_int8pack_mm` (torch 2.13) reads past the row for in_features not a multiple of 16: in_features
    8, 12, 24, 40, 56, 72, 100 segfault or return garbage (reproduced; 16, 32, 48, ..., 576, 1536 are exact).
    Such layers take the fallback under 'auto' and are refused under an explicit 'packed'.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    unsafe = int8_in_features is not None and device.type == "cpu" and int8_in_features % 16 != 0
    if kernel == "packed" and unsafe:
        raise ValueError(f"the packed CPU int8 kernel needs in_features divisible by 16, got {int8_in_features}")
    native_ok = device.type == "cpu" and (cpu_int4.supports(*int4_shape) if int4_shape is not None else
                                          int8_in_features is not None and int8_in_features % cpu_int4.CHUNK == 0)
    if kernel == "native":
        if not native_ok:
            raise ValueError(f"the native int4/int8 kernel takes CPU weights with in_features % 32 == 0 (int4 also "
                             f"out_features % 16 == 0), got {device.type} {int4_shape or int8_in_features}")
        if cpu_int4.library() is None:
            raise RuntimeError("the native CPU kernels are not available here (see the log; MODELCORE_CPU_INT4)")
        return kernel
    if kernel == "auto" and native_ok and cpu_int4.library() is not None:
        return "native"
    if kernel == "auto" and int4_shape is not None and device.type == "cpu" and int4_shape[0] % 16:
        return "fallback"  # torch's packed CPU int4 layout needs out_features divisible by 16
    if kernel == "auto":
        return "packed" if device.type in ("cpu", "cuda") and not unsafe else "fallback"
    return kernel


NATIVE_INT4_DEQUANT_ROWS = 512  # from this many rows on, a native int4 layer runs as bf16 weight x dense GEMM (prefill)
NATIVE_INT4_DEQUANT_ROWS_NO_BF16 = 2048  # the same on CPUs without bf16 units, in float32 (see native_dense_path)


@functools.lru_cache(maxsize=None)
def native_dense_path() -> tuple[int, torch.dtype]:
    """(rows from which a native int4 layer dequantizes its weight and runs a dense GEMM, the GEMM's dtype).

    With bf16 dot-product units (AVX512-BF16, AMX): bf16 from 512 rows. Without them torch's bf16 GEMM crawls
    (5-9 GMAC/s on a 2-core AVX2 EPYC against 35-50 for our int8 kernel and 20-63 for float32): float32, and only
    from 2,048 rows, where it beats our kernel (63 against 51 GMAC/s; at 512 rows they are level)."""
    from modelcore.defaults import cpu_has_native_bf16

    if cpu_has_native_bf16():
        return NATIVE_INT4_DEQUANT_ROWS, torch.bfloat16
    return NATIVE_INT4_DEQUANT_ROWS_NO_BF16, torch.float32
NATIVE_INT8_MAX_ROWS = 16  # our int8 kernel is a per-row dot product: decode-sized inputs; prefill goes to torch's


@functools.lru_cache(maxsize=None)
def native_int8_max_rows() -> int:
    """Up to how many rows a native int8 layer uses our kernel (more go to torch's `_weight_int8pack_mm`, bf16).

    The AVX2 build: every size (its 2x4 tiles ran at 31-54 GMAC/s from 17 to 512 rows against torch's 17-29 on a
    2-core Zen 3 EPYC, where torch's kernel computes in bf16 without bf16 units). The AVX-512 and plain-C builds: 16
    (their int8 path is a per-row dot product, for decode-sized inputs)."""
    lib = cpu_int4.library()
    return 1 << 62 if lib is not None and lib.isa == "avx2" else NATIVE_INT8_MAX_ROWS


class Int8Linear(nn.Module):
    """nn.Linear with int8 per-output-channel weights."""

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, *, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.kernel = _resolve_kernel(kernel, q.device, int8_in_features=self.in_features)
        self.register_buffer("weight", q.contiguous())
        dt = torch.bfloat16 if self.kernel == "packed" else torch.float32  # native: float32 (the same bf16-exact values)
        self.register_buffer("scales", scales.to(dt).contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, lin: nn.Linear, *, kernel: str = "auto") -> "Int8Linear":
        q, s = quantize_int8(lin.weight)
        return cls(q, s, lin.bias, kernel=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "native" and x2.shape[0] > native_int8_max_rows():  # many rows: torch's kernel is faster
            y = torch.ops.aten._weight_int8pack_mm(_bf16_contiguous(x2), self.weight, self.scales.to(torch.bfloat16))
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        elif self.kernel == "native":
            xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            y = cpu_int4.library().int8_matmul(xf, self.weight, self.scales)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        elif self.kernel == "packed":
            y = torch.ops.aten._weight_int8pack_mm(_bf16_contiguous(x2), self.weight, self.scales)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        else:
            w = self.weight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
            y = F.linear(x2, w)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], self.out_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (N, K) = codes * scales."""
        return (self.weight.float() * self.scales.float()[:, None]).to(dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"


class Int4Linear(nn.Module):
    """nn.Linear with asymmetric group-wise int4 weights."""

    def __init__(self, qw: Int4Weights, bias: torch.Tensor | None, *, kernel: str = "auto") -> None:
        super().__init__()
        self.out_features, self.in_features = qw.codes.shape
        self.group_size = qw.group_size
        self.kernel = _resolve_kernel(kernel, qw.codes.device, int4_shape=(self.out_features, self.in_features, self.group_size))
        if self.kernel == "packed":
            self._build_packed(qw)
        elif self.kernel == "native":
            blocks, block_scales = cpu_int4.pack(qw.codes, qw.scales, qw.mins.float() + 8.0 * qw.scales.float())
            self.register_buffer("blocks", blocks)  # (N, K/2) uint8, 16-row blocks (modelcore/cpu_int4.py)
            self.register_buffer("block_scales", block_scales)  # (N, 2G) bfloat16
        else:
            self.register_buffer("codes", _pack_nibbles(qw.codes))  # (N, K/2)
            self.register_buffer("scales", qw.scales.float().contiguous())  # (N, G)
            self.register_buffer("mins", qw.mins.float().contiguous())  # (N, G)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    def _build_packed(self, qw: Int4Weights) -> None:
        zeros = qw.mins.float() + 8.0 * qw.scales.float()
        sz = torch.stack([qw.scales.float(), zeros], dim=-1).transpose(0, 1)  # (G, N, 2)
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16).contiguous())
        if qw.codes.device.type == "cuda" and triton_int4.available() and \
                triton_int4.supports(self.out_features, self.in_features, self.group_size):
            self.register_buffer("packed", triton_int4.pack(qw.codes))  # (N, K/2) uint8, modelcore/triton_int4.py
        elif qw.codes.device.type == "cuda":  # no Triton, or a shape its layout does not take: torch's tinygemm
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

    def rows_readable(self) -> bool:
        """True when single rows can be read back (fallback layout, or the CPU packed layout we know)."""
        if self.kernel in ("fallback", "native"):
            return True
        rows = cpu_int4_block_rows() if self.packed.device.type == "cpu" else None
        return rows is not None and self.out_features % rows == 0

    def int4_rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes (T, K) uint8, scales (T, G) float32, mins (T, G) float32) of output rows `ids` (1-D)."""
        if self.kernel == "fallback":
            return _unpack_nibbles(self.codes[ids]), self.scales[ids], self.mins[ids]
        if self.kernel == "native":
            codes, scales, zeros = cpu_int4.unpack_rows(self.blocks, self.block_scales, ids)
            return codes, scales, zeros - 8.0 * scales
        rows = cpu_int4_block_rows()
        assert rows is not None and self.packed.device.type == "cpu", "rows of this packed layout cannot be read back"
        codes = _cpu_unpack_rows(self.packed, ids, self.in_features, rows)
        sz = self.scales_and_zeros[:, ids].float()  # (G, T, 2)
        scales = sz[..., 0].t()
        return codes, scales, sz[..., 1].t() - 8.0 * scales

    def int4_weights(self) -> Int4Weights:
        """All of the weight as Int4Weights (exact for the fallback and the CPU packed layout)."""
        codes, scales, mins = self.int4_rows(torch.arange(self.out_features, device=self._any_buffer().device))
        return Int4Weights(codes, scales, mins, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float weight (N, K) as the layer computes it (save_pretrained); NotImplementedError for CUDA's layout."""
        if not self.rows_readable():
            raise NotImplementedError("the CUDA int4 layout cannot be read back")
        return self.int4_weights().dequantize(dtype)

    def _any_buffer(self) -> torch.Tensor:
        return getattr(self, {"fallback": "codes", "native": "blocks"}.get(self.kernel, "packed"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "native" and x2.shape[0] >= native_dense_path()[0]:  # prefill: dequantized weight, dense GEMM
            w = cpu_int4.library().dequantize_bf16(self.blocks, self.block_scales, self.group_size)
            if native_dense_path()[1] == torch.bfloat16:
                y = F.linear(_bf16_contiguous(x2), w)
            else:
                y = F.linear(x2.float(), w.float())
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        elif self.kernel == "native":
            xf = x2 if x2.dtype == torch.float32 and x2.is_contiguous() else x2.float().contiguous()
            y = cpu_int4.library().matmul(xf, self.blocks, self.block_scales, self.group_size)
            y = y if y.dtype == x.dtype else y.to(x.dtype)
        elif self.kernel == "packed":
            xb = _bf16_contiguous(x2)
            if self.packed.device.type == "cuda" and self.packed.dtype == torch.uint8:  # our layout, bias fused
                y = torch.ops.modelcore.int4_linear(xb, self.packed, self.scales_and_zeros, self.bias, self.group_size)
                y = y if y.dtype == x.dtype else y.to(x.dtype)
                return y.view(*shape[:-1], self.out_features)
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

    @classmethod
    def from_int4(cls, qw: Int4Weights, dtype: torch.dtype) -> "Int4Embedding":
        """An embedding over ready int4 rows (no re-quantization)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim = qw.codes.shape
        new.group_size, new.out_dtype = qw.group_size, dtype
        new.register_buffer("codes", _pack_nibbles(qw.codes))
        new.register_buffer("scales", qw.scales.float())
        new.register_buffer("mins", qw.mins.float())
        return new

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes = _unpack_nibbles(self.codes[ids]).float()  # (..., D)
        g = self.group_size
        c = codes.unflatten(-1, (self.embedding_dim // g, g))  # (..., G, g)
        w = c * self.scales[ids][..., None] + self.mins[ids][..., None]
        return w.flatten(-2).to(self.out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self(torch.arange(self.num_embeddings, device=self.codes.device)).to(dtype)


class TiedInt4Embedding(nn.Module):
    """The input embedding of a model whose output head is an Int4Linear over the same matrix.

    It owns no tensors: a lookup reads the rows out of the head's weight (packed CPU layout or fallback
    layout), so the tied matrix is stored once, as int4. The head is held as a plain attribute (not a
    submodule), so it is not listed twice in the module tree or the state dict, and `.to()` moves it once.
    """

    def __init__(self, head: Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        if not head.rows_readable():
            raise ValueError("the head's int4 layout cannot be read row by row")
        object.__setattr__(self, "head", head)
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.group_size, self.out_dtype = head.group_size, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        codes, scales, mins = self.head.int4_rows(flat)  # (T, K), (T, G), (T, G)
        g = self.group_size
        w = codes.view(-1, self.embedding_dim // g, g).float() * scales[..., None] + mins[..., None]  # (T, G, g)
        return w.view(*ids.shape, self.embedding_dim).to(self.out_dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.head.dequantize(dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 group={self.group_size}, rows read from the tied head"


def cat_linears(mods: list[nn.Module]) -> nn.Module:
    """One linear computing the given ones side by side: outputs concatenated along out_features.

    For fusing q/k/v or gate/up: all nn.Linear, or all Int8Linear, or all Int4Linear with the same kernel,
    group size and in_features. The codes are concatenated as they are (no re-quantization), so the fused
    layer computes exactly what the separate ones did. Int4 packed on CPU needs each out_features to be a
    multiple of the layout's block (64 rows in torch 2.13); CUDA's int4 layout is not supported.
    """
    if not mods:
        raise ValueError("cat_linears needs at least one module")
    kinds = {type(m) for m in mods}
    if len(kinds) != 1 or len({m.in_features for m in mods}) != 1:
        raise ValueError("cat_linears needs modules of one type and one in_features")
    first = mods[0]
    biases = [m.bias for m in mods]
    if any(b is not None for b in biases):
        bias = torch.cat([b if b is not None else torch.zeros(m.out_features, device=_dev(m)) for b, m in zip(biases, mods)])
    else:
        bias = None
    if isinstance(first, nn.Linear):
        out = nn.Linear(first.in_features, sum(m.out_features for m in mods), bias=bias is not None,
                        device="meta").to_empty(device=first.weight.device).to(first.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(torch.cat([m.weight for m in mods]))
            if bias is not None:
                out.bias.copy_(bias)
        return out.requires_grad_(first.weight.requires_grad)
    if isinstance(first, Int8Linear):
        if len({m.kernel for m in mods}) != 1:
            raise ValueError("cat_linears: Int8Linear modules use different kernels")
        new = Int8Linear.__new__(Int8Linear)
        nn.Module.__init__(new)
        new.out_features, new.in_features, new.kernel = sum(m.out_features for m in mods), first.in_features, first.kernel
        new.register_buffer("weight", torch.cat([m.weight for m in mods]).contiguous())
        new.register_buffer("scales", torch.cat([m.scales for m in mods]).contiguous())
        new.register_buffer("bias", bias)
        return new
    if isinstance(first, Int4Linear):
        if len({(m.kernel, m.group_size) for m in mods}) != 1:
            raise ValueError("cat_linears: Int4Linear modules differ in kernel or group size")
        new = Int4Linear.__new__(Int4Linear)
        nn.Module.__init__(new)
        new.out_features, new.in_features = sum(m.out_features for m in mods), first.in_features
        new.group_size, new.kernel = first.group_size, first.kernel
        if first.kernel == "fallback":
            for name in ("codes", "scales", "mins"):
                new.register_buffer(name, torch.cat([getattr(m, name) for m in mods]).contiguous())
        elif first.kernel == "native":  # 16-row blocks are row-contiguous in both buffers
            for name in ("blocks", "block_scales"):
                new.register_buffer(name, torch.cat([getattr(m, name) for m in mods]).contiguous())
        else:
            rows = cpu_int4_block_rows() if first.packed.device.type == "cpu" else None
            if rows is None or any(m.out_features % rows for m in mods):
                raise ValueError("cat_linears: packed int4 needs the CPU layout and out_features divisible by its block "
                                 f"({rows} rows); got {[m.out_features for m in mods]}")
            new.register_buffer("packed", torch.cat([m.packed for m in mods]).contiguous())  # blocks are row-contiguous
            new.register_buffer("scales_and_zeros", torch.cat([m.scales_and_zeros for m in mods], dim=1).contiguous())
        new.register_buffer("bias", bias)
        return new
    raise ValueError(f"cat_linears does not know {type(first).__name__}")


def _dev(m: nn.Module) -> torch.device:
    return next(iter(m.buffers()), None).device if next(iter(m.buffers()), None) is not None else next(m.parameters()).device


EMBEDDINGS = ("int8", "int4")


def quantize_model(
    model: nn.Module,
    mode: str | None,
    *,
    group_size: int = 32,
    kernel: str = "auto",
    prequantized: Mapping[str, Int4Weights] | None = None,
    quantize_embeddings: bool = True,
    embeddings: str | None = None,
    embedding_group_size: int = 32,
    head_col_weights: torch.Tensor | None | str = "norm",
    head_calibration: torch.Tensor | None = None,
) -> nn.Module:
    """Swap every nn.Linear (and nn.Embedding when `quantize_embeddings`) for its quantized twin, in place.

    embeddings: "int8" (per row, the default in both modes) or "int4" (group-wise, `embedding_group_size`).
    An output head tied to the embedding is quantized with it and the matrix stays stored once: int8 -> an
    Int8Linear over the same int8 tensor; int4 -> an Int4Linear whose rows the TiedInt4Embedding reads back.
    The int4 embedding/head is quantized with the refined search (`quantize_int4(refine=True)`), its error
    weighted per input column by `head_col_weights` ("norm": the square of the final RMSNorm weight, the
    scale of the hidden state the head multiplies; None: unweighted).
    head_calibration: token ids (B, T) or (T,) of calibration text. With embeddings="int4" and a tied head, the
    other linears are quantized first, the model's final hidden states on these tokens give H = X^T X, and
    the tied matrix is quantized by GPTQ (`gptq_int4`) against H instead (SmolLM2, 4,096 tokens
    of a 10-K filing as calibration: perplexity +4.96% -> +1.30% on 20k TAT-QA tokens). Calibrate on other text
    than the evaluation text.
    `prequantized` maps `"{linear}.weight"` to ready int4 codes (from a Q4_0/Q4_1 GGUF tensor); those linears
    may still hold meta weights. Returns `model`.
    """
    if mode is None:
        return model
    if mode not in MODES:
        raise ValueError(f"quantization must be None, 'int8' or 'int4', got {mode!r}")
    emb_mode = (embeddings or "int8") if quantize_embeddings else None
    if emb_mode is not None and emb_mode not in EMBEDDINGS:
        raise ValueError(f"embeddings must be one of {EMBEDDINGS} or None, got {embeddings!r}")
    prequantized = dict(prequantized or {})
    int8_of: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(float embedding weight) -> (q, scales)
    int4_head_of: dict[int, Int4Linear] = {}  # id(float embedding weight) -> the tied head
    head = getattr(model, "lm_head", None)
    tied_w = head.weight if isinstance(head, nn.Linear) and isinstance(getattr(getattr(model, "model", None), "embed_tokens", None),
                                                                       nn.Embedding) and head.weight is model.model.embed_tokens.weight else None
    for parent in list(model.modules()) if emb_mode else []:
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Embedding):
                continue
            w = child.weight
            if emb_mode == "int4" and w is tied_w and head_calibration is not None:
                continue  # quantized last, by GPTQ on the hidden states of the otherwise quantized model
            if emb_mode == "int4" and w is tied_w:
                cols = _head_col_weights(model, head_col_weights)
                qw = quantize_int4(w, group_size=embedding_group_size, refine=True, col_weights=cols)
                lin = Int4Linear(qw, None, kernel=kernel)
                if lin.rows_readable():
                    int4_head_of[id(w)] = lin
                    setattr(parent, child_name, TiedInt4Embedding(lin, w.dtype))
                    continue
            if emb_mode == "int4" and w is not tied_w:
                setattr(parent, child_name, Int4Embedding(w, w.dtype, group_size=embedding_group_size))
                continue
            qs = int8_of.setdefault(id(w), quantize_int8(w))  # int8, or an int4 layout that cannot be read back
            setattr(parent, child_name, Int8Embedding(w, w.dtype, quantized=qs))
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if not isinstance(child, nn.Linear):
                continue
            pre = prequantized.pop(f"{full}.weight", None)
            if child.weight is tied_w and emb_mode == "int4" and head_calibration is not None:
                continue
            tied8, tied4 = int8_of.get(id(child.weight)), int4_head_of.get(id(child.weight))
            if tied4 is not None:
                new: nn.Module = tied4
            elif tied8 is not None:
                new = Int8Linear(tied8[0], tied8[1], child.bias, kernel=kernel)
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
    if emb_mode == "int4" and tied_w is not None and head_calibration is not None:
        _gptq_tied_head(model, head_calibration, embedding_group_size, kernel)
    model.quantization = {"mode": mode, "group_size": group_size if mode == "int4" else None,
                          "embeddings": emb_mode, "embedding_group_size": embedding_group_size if emb_mode == "int4" else None}
    return model


@torch.no_grad()
def _gptq_tied_head(model: nn.Module, ids: torch.Tensor, group_size: int, kernel: str) -> None:
    """Quantize the tied embedding/head by GPTQ on the final hidden states of `ids` (the rest already quantized)."""
    emb = model.model.embed_tokens
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    window = min(512, getattr(getattr(model, "args", None), "max_position_embeddings", 512))
    rows = [ids[b:b + 1, i:i + window] for b in range(ids.shape[0]) for i in range(0, ids.shape[1], window)]
    k = emb.weight.shape[1]
    h = torch.zeros(k, k, dtype=torch.float64)
    n = 0
    for chunk in rows:
        x = model.forward_hidden(chunk.to(emb.weight.device))[0].double().cpu()  # (T, K)
        h += x.T @ x
        n += x.shape[0]
    qw = gptq_int4(emb.weight, (h / max(n, 1)).float(), group_size=group_size)
    head = Int4Linear(qw, None, kernel=kernel)
    model.lm_head = head
    model.model.embed_tokens = TiedInt4Embedding(head, emb.weight.dtype) if head.rows_readable() else \
        Int4Embedding.from_int4(qw, emb.weight.dtype)


def gptq_int4(w: torch.Tensor, h: torch.Tensor, *, group_size: int = 32, block: int = 128, damp: float = 0.01) -> Int4Weights:
    """Group-wise asymmetric int4 by GPTQ (Frantar et al., 2022): columns quantized left to right, each one's
    rounding error spread over the columns not yet quantized through the inverse of H = E[x x^T] (K, K), so the
    layer's OUTPUT error on inputs like x is small rather than each weight's. Group (scale, min) are taken from
    min/max of the group's updated weights when the group starts, bfloat16-exact like `quantize_int4(refine=True)`.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {GROUP_SIZES}, got {group_size}")
    w = w.detach().float().clone()
    n, k = w.shape
    if k % group_size or block % group_size:
        raise ValueError(f"in_features {k} and block {block} must be multiples of group_size {group_size}")
    h = h.detach().double().clone()
    dead = h.diag() <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * h.diag().mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # (K, K)
    codes = torch.zeros(n, k, dtype=torch.uint8)
    scales, mins = torch.zeros(n, k // group_size), torch.zeros(n, k // group_size)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb, errs, ub = w[:, b0:b1].clone(), torch.zeros(n, b1 - b0), u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col, gi = b0 + i, (b0 + i) // group_size
            if col % group_size == 0:
                grp = wb[:, i:i + group_size]
                mn, mx = grp.amin(1), grp.amax(1)
                sc = _bf16_ceil(((mx - mn) / 15.0).clamp(min=1e-10))
                zero = (mn + 8.0 * sc).to(torch.bfloat16).float()
                scales[:, gi], mins[:, gi] = sc, zero - 8.0 * sc
            sc, mn = scales[:, gi], mins[:, gi]
            c = torch.round((wb[:, i] - mn) / sc).clamp(0, 15)
            codes[:, col] = c.to(torch.uint8)
            err = (wb[:, i] - (c * sc + mn)) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return Int4Weights(codes, scales, mins, group_size)


def _head_col_weights(model: nn.Module, how: torch.Tensor | None | str) -> torch.Tensor | None:
    if how is None or isinstance(how, torch.Tensor):
        return how
    if how != "norm":
        raise ValueError(f"head_col_weights must be a tensor, None or 'norm', got {how!r}")
    norm = getattr(getattr(model, "model", None), "norm", None)
    w = getattr(norm, "weight", None)
    return None if w is None or w.device.type == "meta" else w.detach().float() ** 2


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
