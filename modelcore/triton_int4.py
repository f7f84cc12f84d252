"""CUDA int4 weight-only matmul and dequantization in Triton (our own layout; replaces torch's tinygemm on CUDA).

Layout ("half-split"): packed (N, K/2) uint8, row-major. Within each group of g input columns, byte j of the
group holds column j in its low nibble and column j + g/2 in its high nibble, so a group's low nibbles multiply
x[k0 : k0+g/2] and its high nibbles x[k0+g/2 : k0+g] (two plain dot products, no interleaving).
scales_and_zeros (G, N, 2) bfloat16, as for tinygemm: w = (code - 8) * scale + zero.

Matmul: y[m, n] = sum_g scale[g, n] * (x_g . codes_g[n]) + (zero - 8 * scale)[g, n] * sum(x_g), the dot of bf16
activations with the exact small-integer codes in tensor cores (fp32 accumulation), the scale applied once per
group. Programs tile N in blocks of BN rows and split K into `split` ranges of groups (enough programs to fill the
GPU at batch 1); partial sums (split, M, N) float32 are added by the caller. Registered as a torch custom op so
torch.compile'd blocks and CUDA graphs take it as one opaque kernel.
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def pack_half_split(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8 in the half-split layout."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // group_size, 2, group_size // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_half_split(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """(T, K/2) uint8 half-split rows -> (T, K) codes."""
    t, kh = packed.shape
    p = packed.view(t, 2 * kh // group_size, group_size // 2)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(t, 2 * kh)


if triton is not None:

    @triton.jit
    def _int4_mm_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, M, N, K, stride_xm,
                        GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, GPS: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        pid_m = tl.program_id(2)
        HALF: tl.constexpr = GROUP // 2
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rh = tl.arange(0, HALF)
        mmask = rm < M
        nmask = rn < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        kh = K // 2
        for gi in range(GPS):
            g = pid_k * GPS + gi
            k0 = g * GROUP
            xp = x_ptr + rm[:, None] * stride_xm + k0 + rh[None, :]
            xlo = tl.load(xp, mask=mmask[:, None], other=0.0)
            xhi = tl.load(xp + HALF, mask=mmask[:, None], other=0.0)
            wb = tl.load(w_ptr + rn[:, None] * kh + g * HALF + rh[None, :], mask=nmask[:, None], other=0)
            lo = (wb & 15).to(tl.bfloat16)
            hi = (wb >> 4).to(tl.bfloat16)
            d = tl.dot(xlo, tl.trans(lo)) + tl.dot(xhi, tl.trans(hi))  # (BM, BN) float32
            sp = sz_ptr + (g * N + rn) * 2
            s = tl.load(sp, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(sp + 1, mask=nmask, other=0.0).to(tl.float32)
            xs = tl.sum(xlo.to(tl.float32), axis=1) + tl.sum(xhi.to(tl.float32), axis=1)  # (BM,)
            acc += d * s[None, :] + xs[:, None] * (z - 8.0 * s)[None, :]
        op = out_ptr + pid_k * M * N + rm[:, None] * N + rn[None, :]
        tl.store(op, acc, mask=mmask[:, None] & nmask[None, :])

    @triton.jit
    def _int4_dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, BN: tl.constexpr):
        pid_n = tl.program_id(0)
        g = tl.program_id(1)
        HALF: tl.constexpr = GROUP // 2
        rn = pid_n * BN + tl.arange(0, BN)
        rh = tl.arange(0, HALF)
        nmask = rn < N
        wb = tl.load(w_ptr + rn[:, None] * (K // 2) + g * HALF + rh[None, :], mask=nmask[:, None], other=0)
        sp = sz_ptr + (g * N + rn) * 2
        s = tl.load(sp, mask=nmask, other=0.0)
        z = tl.load(sp + 1, mask=nmask, other=0.0)
        lo = ((wb & 15).to(tl.bfloat16) - 8) * s[:, None] + z[:, None]
        hi = ((wb >> 4).to(tl.bfloat16) - 8) * s[:, None] + z[:, None]
        op = out_ptr + rn[:, None] * K + g * GROUP + rh[None, :]
        tl.store(op, lo, mask=nmask[:, None])
        tl.store(op + HALF, hi, mask=nmask[:, None])


if triton is not None:

    @triton.jit
    def _tiled_dequant_kernel(p_ptr, where_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, BT: tl.constexpr):
        """tinygemm's CUDA layout (inner_k_tiles=8: one 512-byte 8x128 tile per (N/8, K/128)) -> bf16 (N, K).
        A program reads BT tiles of one 128-column strip; `where` (8, 128) int32 is read once per program."""
        kt = tl.program_id(1)
        t = tl.program_id(0) * BT + tl.arange(0, BT)  # 8-row tile index
        r = tl.arange(0, 8)
        c = tl.arange(0, 128)
        tmask = t < N // 8
        nib = tl.load(where_ptr + r[:, None] * 128 + c[None, :])  # (8, 128): nibble (memory order) of each element
        base = (t * (K // 128) + kt) * 512
        b = tl.load(p_ptr + base[:, None, None] + (nib // 2)[None, :, :], mask=tmask[:, None, None], other=0).to(tl.int32)
        code = (b >> ((nib & 1) * 4)[None, :, :]) & 15  # (BT, 8, 128)
        n = t[:, None] * 8 + r[None, :]  # (BT, 8)
        if GROUP == 128:
            sp = sz_ptr + (kt * N + n) * 2
            s = tl.load(sp, mask=tmask[:, None], other=0.0).to(tl.float32)[:, :, None]
            z = tl.load(sp + 1, mask=tmask[:, None], other=0.0).to(tl.float32)[:, :, None]
        else:
            g = (kt * 128 + c) // GROUP
            sp = sz_ptr + (g[None, None, :] * N + n[:, :, None]) * 2
            s = tl.load(sp, mask=tmask[:, None, None], other=0.0).to(tl.float32)
            z = tl.load(sp + 1, mask=tmask[:, None, None], other=0.0).to(tl.float32)
        w = (code.to(tl.float32) - 8.0) * s + z
        tl.store(out_ptr + n[:, :, None] * K + kt * 128 + c[None, None, :], w.to(tl.bfloat16), mask=tmask[:, None, None])


_WHERE32: dict = {}


def _where32(where: torch.Tensor) -> torch.Tensor:
    key = (where.device, where.data_ptr())
    if key not in _WHERE32:
        _WHERE32[key] = where.to(torch.int32).contiguous()
    return _WHERE32[key]


def dequantize_tiled(packed: torch.Tensor, sz: torch.Tensor, where: torch.Tensor, group_size: int, n: int, k: int,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """bf16 weight (N, K) of a tinygemm CUDA int4 weight (inner_k_tiles=8) in one kernel; `where` from
    modelcore.model._cuda_int4_tile_order; `out` an optional (N, K) bf16 buffer to reuse."""
    if out is None:
        out = torch.empty(n, k, device=packed.device, dtype=torch.bfloat16)
    bt = 8
    _tiled_dequant_kernel[(triton.cdiv(n // 8, bt), k // 128)](packed.view(torch.uint8), _where32(where), sz, out, n, k,
                                                              GROUP=group_size, BT=bt, num_warps=8)
    return out


if triton is not None:

    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, N, K, GROUP: tl.constexpr, BN: tl.constexpr, GPI: tl.constexpr,
                          ITERS: tl.constexpr):
        """Batch-1 twin of _int4_mm_kernel without tensor cores: GPI groups (GPI * GROUP / 2 contiguous bytes per row)
        per iteration, products in float32 registers."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        HALF: tl.constexpr = GROUP // 2
        rn = pid_n * BN + tl.arange(0, BN)
        rj = tl.arange(0, GPI)
        rh = tl.arange(0, HALF)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for it in range(ITERS):
            gj = (pid_k * ITERS + it) * GPI + rj
            xo = gj[:, None] * GROUP + rh[None, :]
            xlo = tl.load(x_ptr + xo).to(tl.float32)
            xhi = tl.load(x_ptr + xo + HALF).to(tl.float32)
            wb = tl.load(w_ptr + rn[:, None, None] * (K // 2) + gj[None, :, None] * HALF + rh[None, None, :])
            lo = (wb & 15).to(tl.float32)
            hi = (wb >> 4).to(tl.float32)
            d = tl.sum(lo * xlo[None, :, :] + hi * xhi[None, :, :], axis=2)  # (BN, GPI)
            sp = sz_ptr + (gj[None, :] * N + rn[:, None]) * 2
            s = tl.load(sp).to(tl.float32)
            z = tl.load(sp + 1).to(tl.float32)
            xs = tl.sum(xlo, axis=1) + tl.sum(xhi, axis=1)
            acc += tl.sum(d * s + xs[None, :] * (z - 8.0 * s), axis=1)
        tl.store(out_ptr + pid_k * N + rn, acc)


def int4_gemv_partials(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, n: int, *, bn: int = 16,
                       gpi: int = 4, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """(split, N) float32 partials of one row x (K,) bf16 times the half-split weight; N % bn == 0,
    (K / group_size) % gpi == 0."""
    k = x.shape[-1]
    chunks = k // group_size // gpi
    want = 2 * _sm_count(torch.cuda.current_device())
    split = next((d for d in range(1, chunks + 1) if chunks % d == 0 and (n // bn) * d >= want), chunks)
    out = torch.empty(split, n, device=x.device, dtype=torch.float32)
    _int4_gemv_kernel[(n // bn, split)](x, packed, sz, out, n, k, GROUP=group_size, BN=bn, GPI=gpi, ITERS=chunks // split,
                                        num_warps=num_warps, num_stages=num_stages)
    return out


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


BN_DEFAULT = 64


def choose_split(m: int, n: int, k: int, group_size: int, bn: int = BN_DEFAULT) -> int:
    """Smallest divisor of the group count that gives at least two waves of programs."""
    groups = k // group_size
    tiles = -(-n // bn) * -(-m // _bm(m))
    want = 2 * _sm_count(torch.cuda.current_device())
    for d in range(1, groups + 1):
        if groups % d == 0 and tiles * d >= want:
            return d
    return groups


def _bm(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def int4_mm_partials(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, n: int,
                     split: int = 0, bn: int = BN_DEFAULT, num_warps: int = 4, num_stages: int = 3) -> torch.Tensor:
    """Partial products (split, M, N) float32 of x (M, K) bf16 with the half-split int4 weight."""
    m, k = x.shape
    if split <= 0:
        split = choose_split(m, n, k, group_size, bn)
    bm = _bm(m)
    out = torch.empty(split, m, n, device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(n, bn), split, triton.cdiv(m, bm))
    _int4_mm_kernel[grid](x, packed, sz, out, m, n, k, x.stride(0), GROUP=group_size, BM=bm, BN=bn,
                          GPS=(k // group_size) // split, num_warps=num_warps, num_stages=num_stages)
    return out


def dequantize(packed: torch.Tensor, sz: torch.Tensor, group_size: int, n: int, k: int) -> torch.Tensor:
    """bf16 weight (N, K) of a half-split int4 weight, one kernel."""
    out = torch.empty(n, k, device=packed.device, dtype=torch.bfloat16)
    bn = 32
    _int4_dequant_kernel[(triton.cdiv(n, bn), k // group_size)](packed, sz, out, n, k, GROUP=group_size, BN=bn, num_warps=4)
    return out


if triton is not None:

    @torch.library.custom_op("modelcore::int4_mm", mutates_args=())
    def int4_mm_op(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, n: int) -> torch.Tensor:
        """y (M, N) bf16 = x (M, K) bf16 @ int4 weight^T."""
        xc = x if x.stride(-1) == 1 else x.contiguous()
        part = int4_mm_partials(xc, packed, sz, group_size, n)
        return (part[0] if part.shape[0] == 1 else part.sum(0)).to(torch.bfloat16)

    @int4_mm_op.register_fake
    def _(x, packed, sz, group_size, n):
        return x.new_empty(x.shape[0], n, dtype=torch.bfloat16)

    @torch.library.custom_op("modelcore::int4_dequant", mutates_args=())
    def int4_dequant_op(packed: torch.Tensor, sz: torch.Tensor, group_size: int, n: int, k: int) -> torch.Tensor:
        return dequantize(packed, sz, group_size, n, k)

    @int4_dequant_op.register_fake
    def _(packed, sz, group_size, n, k):
        return packed.new_empty(n, k, dtype=torch.bfloat16)
