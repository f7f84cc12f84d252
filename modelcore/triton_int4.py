"""CUDA int4 weight-only linear in Triton: our own weight layout, a GEMV for decode, a dequantizer for long inputs.

Layout ("block-32"): packed (N, K/2) uint8, row-major, read as int32 words (N, K/8). Each 32 input columns of a row
are one block of 4 words (16 bytes); nibble s (bits 4s..4s+3, s = 0..7) of word w (0..3) holds column 4s + w of the
block. So a thread that loads one 16-byte block needs, for nibble s, the 4 contiguous activations x[4s : 4s+4] of
the block, and a block never straddles a quantization group (groups of 32, 64 or 128 columns).
scales_and_zeros (G, N, 2) bfloat16 (as torch's tinygemm takes them): w = (code - 8) * scale + zero, read as one
int32 per (group, row).

Decode (M <= GEMV_MAX_ROWS rows of x): `_gemv_kernel`, one program per BN output rows streaming all of K, BB
blocks per step (the next step's weights loading while one computes), float32 FMAs, up to 8 rows of x per pass over
the weights; for few output rows and long K, K is split over more programs and the partial sums added after.
Nibbles become floats without int->float conversion instructions: a nibble moved to bits 16..19 and or-ed into the
bits of 1.0f reads as f = 1 + code/128 (exact), so per block
sum(code * x) = 128 * (sum(f * x) - sum(x)), and with the block's scale s and zero z
sum(w * x) = 128 s sum(f x) + (z - 136 s) sum(x). The bias (float32) is added before the bfloat16 rounding.
Longer inputs: `dequantize` writes the bf16 weight (one kernel) and the caller runs the dense GEMM.
`int4_linear_op` (torch custom op "modelcore::int4_linear") picks between the two, so torch.compile'd blocks and
CUDA graphs see one opaque op.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

ONE_F32_BITS = 0x3F800000  # the bits of 1.0f, a kernel argument (see _nibble_as_float)
GEMV_MAX_ROWS = 4  # rows of x up to which the GEMV runs; above, dequantize + dense GEMM (faster from 5 rows on)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def supports(n: int, k: int, group_size: int) -> bool:
    """Shapes the layout takes: whole 32-column blocks, groups made of whole blocks."""
    return k % 32 == 0 and group_size % 32 == 0 and k % group_size == 0


def pack(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes 0..15 -> (N, K/2) uint8 in the block-32 layout (any device)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).view(n, k // 32, 4, 2, 4)  # (N, blocks, byte q, low/high nibble, word w): column 4(2q+h)+w
    byte = c[:, :, :, 0] | (c[:, :, :, 1] << 4)  # (N, blocks, q, w)
    return byte.transpose(2, 3).reshape(n, k // 2).contiguous()  # word-major, little-endian bytes within a word


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 block-32 rows -> (N, K) codes (the twin of `pack`)."""
    n, kh = packed.shape
    b = packed.view(n, kh // 16, 4, 4)  # (N, blocks, word w, byte q)
    nib = torch.stack([b & 15, b >> 4], dim=-1).view(n, kh // 16, 4, 8)  # (N, blocks, w, nibble s = 2q + h)
    return nib.transpose(2, 3).reshape(n, 2 * kh)  # column 4s + w


def dequantize_reference(packed: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 weight (N, K) from the packed layout with plain torch ops: (code - 8) * scale + zero."""
    codes = unpack(packed)
    n, k = codes.shape
    s = sz[..., 0].float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    z = sz[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (codes.float() - 8.0) * s + z


if triton is not None:

    @triton.jit
    def _nibble_as_float(w, S: tl.constexpr, one):
        """1 + code/128 for nibble S of each int32 word (exact): the nibble moved to bits 16..19 of 1.0f. `one` is
        0x3F800000 passed at run time, so the mask-and-or is one LOP3 (a second immediate would need a second LOP3)."""
        if S < 4:
            v = w << (16 - 4 * S)
        elif S == 4:
            v = w
        else:
            v = w >> (4 * S - 16)  # arithmetic shift: the sign bits land above bit 19 and are masked off
        return ((v & 0xF0000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_i32(ptrs):
        """Elementwise 4-byte load that keeps the layout of `ptrs` (a tl.load gets a coalesced layout of its own, and
        converting the scales into the weights' layout would cost a shared-memory round trip and a barrier per step)."""
        return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                         pack=1)

    @triton.jit
    def _load_x(xp, xoff):
        """One row's activations for a step, float32, as 8 vectors (BB*4,): vector s holds x[4s + w] of each block."""
        return (tl.load(xp + xoff).to(tl.float32), tl.load(xp + 4 + xoff).to(tl.float32),
                tl.load(xp + 8 + xoff).to(tl.float32), tl.load(xp + 12 + xoff).to(tl.float32),
                tl.load(xp + 16 + xoff).to(tl.float32), tl.load(xp + 20 + xoff).to(tl.float32),
                tl.load(xp + 24 + xoff).to(tl.float32), tl.load(xp + 28 + xoff).to(tl.float32))

    @triton.jit
    def _row_step(w, a, c, x0, x1, x2, x3, x4, x5, x6, x7, one, BN: tl.constexpr, BB: tl.constexpr):
        """(BN, BB): sum over each block of w * x = a * sum(f * x) + c * sum(x), for one row of x."""
        part = _nibble_as_float(w, 0, one) * x0[None, :]  # one FMA per nibble: a chain, not a tree
        part = part + _nibble_as_float(w, 1, one) * x1[None, :]
        part = part + _nibble_as_float(w, 2, one) * x2[None, :]
        part = part + _nibble_as_float(w, 3, one) * x3[None, :]
        part = part + _nibble_as_float(w, 4, one) * x4[None, :]
        part = part + _nibble_as_float(w, 5, one) * x5[None, :]
        part = part + _nibble_as_float(w, 6, one) * x6[None, :]
        part = part + _nibble_as_float(w, 7, one) * x7[None, :]
        xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        p = tl.sum(tl.reshape(part, (BN, BB, 4)), axis=2)  # the 4 words of a block are in one thread
        q = tl.sum(tl.reshape(tl.broadcast_to(xs[None, :], (BN, BB * 4)), (BN, BB, 4)), axis=2)
        return a * p + c * q

    @triton.jit
    def _other_row(w, a, c, xp, xoff, one, BN: tl.constexpr, BB: tl.constexpr):
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(xp, xoff)
        return _row_step(w, a, c, x0, x1, x2, x3, x4, x5, x6, x7, one, BN, BB)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, one,
                     GROUP: tl.constexpr, MB: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr, KS: tl.constexpr):
        """y (M, N) = x (M, K) @ w^T for M <= MB (1, 2, 4 or 8): program pid takes output rows [pid*BN, +BN) over
        all of K, BB blocks (BB * 16 bytes of each row) per step; the weights are read once for all M rows. The next
        step's weights, scales and first row of x load while a step computes (weights PREFETCH steps ahead).
        KS > 1: program (pid, k) takes the k-th of KS ranges of steps and stores float32 partial sums (KS, M, N) to
        y_ptr, added up with the bias by _split_sum_kernel (more programs for few rows and long K)."""
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        rnc = tl.minimum(rn, N - 1)  # clamped rows: unmasked loads; the stores are masked
        j = tl.arange(0, BB * 4)  # word j of a step: block j // 4, word j % 4
        xoff = (j // 4) * 32 + (j % 4)
        rb = tl.arange(0, BB)
        wp = w_ptr + rnc[:, None] * stride_wn + j[None, :]  # (BN, BB*4) int32
        szp = sz_ptr + rnc[:, None]
        x1 = x_ptr + tl.minimum(1, M - 1) * stride_xm  # rows past M read row M-1 and are not stored
        x2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
        x3 = x_ptr + tl.minimum(3, M - 1) * stride_xm
        x4 = x_ptr + tl.minimum(4, M - 1) * stride_xm
        x5 = x_ptr + tl.minimum(5, M - 1) * stride_xm
        x6 = x_ptr + tl.minimum(6, M - 1) * stride_xm
        x7 = x_ptr + tl.minimum(7, M - 1) * stride_xm
        acc0 = tl.zeros((BN, BB), dtype=tl.float32)
        acc1 = tl.zeros((BN, BB), dtype=tl.float32)
        acc2 = tl.zeros((BN, BB), dtype=tl.float32)
        acc3 = tl.zeros((BN, BB), dtype=tl.float32)
        acc4 = tl.zeros((BN, BB), dtype=tl.float32)
        acc5 = tl.zeros((BN, BB), dtype=tl.float32)
        acc6 = tl.zeros((BN, BB), dtype=tl.float32)
        acc7 = tl.zeros((BN, BB), dtype=tl.float32)
        steps = K // 32 // BB
        first = (tl.program_id(1) * steps // KS) * BB  # this program's blocks [first, end)
        end = ((tl.program_id(1) + 1) * steps // KS) * BB
        w = tl.load(wp + first * 4, eviction_policy="evict_first")
        if PREFETCH == 2:
            w1 = tl.load(wp + tl.minimum(first + BB, end - BB) * 4, eviction_policy="evict_first")
        sz = _load_i32(szp + ((first + rb) // (GROUP // 32))[None, :] * N)  # (BN, BB): bf16 scale (low), zero (high)
        y0, y1, y2, y3, y4, y5, y6, y7 = _load_x(x_ptr + first * 32, xoff)
        for b0 in range(first, end, BB):
            nb = tl.minimum(b0 + BB, end - BB)  # the next step (the last step reloads itself)
            w_next = tl.load(wp + tl.minimum(b0 + PREFETCH * BB, end - BB) * 4, eviction_policy="evict_first")
            sz_next = _load_i32(szp + ((nb + rb) // (GROUP // 32))[None, :] * N)
            n0, n1, n2, n3, n4, n5, n6, n7 = _load_x(x_ptr + nb * 32, xoff)
            sc = (sz << 16).to(tl.float32, bitcast=True)
            zr = (sz & -65536).to(tl.float32, bitcast=True)
            a = 128.0 * sc
            c = zr - 136.0 * sc
            xo = b0 * 32
            acc0 += _row_step(w, a, c, y0, y1, y2, y3, y4, y5, y6, y7, one, BN, BB)
            if MB > 1:
                acc1 += _other_row(w, a, c, x1 + xo, xoff, one, BN, BB)
            if MB > 2:
                acc2 += _other_row(w, a, c, x2 + xo, xoff, one, BN, BB)
                acc3 += _other_row(w, a, c, x3 + xo, xoff, one, BN, BB)
            if MB > 4:
                acc4 += _other_row(w, a, c, x4 + xo, xoff, one, BN, BB)
                acc5 += _other_row(w, a, c, x5 + xo, xoff, one, BN, BB)
                acc6 += _other_row(w, a, c, x6 + xo, xoff, one, BN, BB)
                acc7 += _other_row(w, a, c, x7 + xo, xoff, one, BN, BB)
            if PREFETCH == 2:
                w = w1
                w1 = w_next
            else:
                w = w_next
            sz = sz_next
            y0, y1, y2, y3, y4, y5, y6, y7 = n0, n1, n2, n3, n4, n5, n6, n7
        nmask = rn < N
        if KS > 1:  # float32 partial sums, row m of split k at y_ptr + (k * M + m) * N
            yp = y_ptr + tl.program_id(1) * M * N + rn
            tl.store(yp, tl.sum(acc0, axis=1), mask=nmask)
            if MB > 1:
                tl.store(yp + N, tl.sum(acc1, axis=1), mask=nmask & (M > 1))
            if MB > 2:
                tl.store(yp + 2 * N, tl.sum(acc2, axis=1), mask=nmask & (M > 2))
                tl.store(yp + 3 * N, tl.sum(acc3, axis=1), mask=nmask & (M > 3))
            if MB > 4:
                tl.store(yp + 4 * N, tl.sum(acc4, axis=1), mask=nmask & (M > 4))
                tl.store(yp + 5 * N, tl.sum(acc5, axis=1), mask=nmask & (M > 5))
                tl.store(yp + 6 * N, tl.sum(acc6, axis=1), mask=nmask & (M > 6))
                tl.store(yp + 7 * N, tl.sum(acc7, axis=1), mask=nmask & (M > 7))
        else:
            bias = tl.zeros((BN,), dtype=tl.float32)
            if HAS_BIAS:
                bias = tl.load(b_ptr + rnc)
            tl.store(y_ptr + rn, (tl.sum(acc0, axis=1) + bias).to(tl.bfloat16), mask=nmask)
            if MB > 1:
                tl.store(y_ptr + N + rn, (tl.sum(acc1, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 1))
            if MB > 2:
                tl.store(y_ptr + 2 * N + rn, (tl.sum(acc2, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 2))
                tl.store(y_ptr + 3 * N + rn, (tl.sum(acc3, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 3))
            if MB > 4:
                tl.store(y_ptr + 4 * N + rn, (tl.sum(acc4, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 4))
                tl.store(y_ptr + 5 * N + rn, (tl.sum(acc5, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 5))
                tl.store(y_ptr + 6 * N + rn, (tl.sum(acc6, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 6))
                tl.store(y_ptr + 7 * N + rn, (tl.sum(acc7, axis=1) + bias).to(tl.bfloat16), mask=nmask & (M > 7))

    @triton.jit
    def _split_sum_kernel(part_ptr, b_ptr, y_ptr, MN, N, KS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
        """y (M*N,) bf16 = sum over KS of the partials (KS, M*N) float32 (+ bias (N,))."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < MN
        acc = tl.load(part_ptr + i, mask=mask, other=0.0)
        for k in tl.static_range(1, KS):
            acc += tl.load(part_ptr + k * MN + i, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + i % N, mask=mask, other=0.0)
        tl.store(y_ptr + i, acc.to(tl.bfloat16), mask=mask)

    @triton.jit
    def _dequant_kernel(w_ptr, sz_ptr, out_ptr, N, K, stride_wn, one, GROUP: tl.constexpr, BN: tl.constexpr,
                        BB: tl.constexpr):
        """bf16 weight rows [pid0*BN, +BN), blocks [pid1*BB, +BB): (code - 8) * scale + zero, rounded once. The 8
        nibbles of each word are joined and reordered in registers so each thread stores whole 16-byte runs."""
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rnc = tl.minimum(rn, N - 1)
        j = tl.arange(0, BB * 4)
        b0 = tl.program_id(1) * BB
        w = tl.load(w_ptr + rnc[:, None] * stride_wn + b0 * 4 + j[None, :])  # (BN, BB*4)
        sz = _load_i32(sz_ptr + ((b0 + j // 4) // (GROUP // 32))[None, :] * N + rnc[:, None])
        sc = (sz << 16).to(tl.float32, bitcast=True)
        zr = (sz & -65536).to(tl.float32, bitcast=True)
        a = 128.0 * sc
        c = zr - 136.0 * sc
        v0 = (_nibble_as_float(w, 0, one) * a + c).to(tl.bfloat16)
        v1 = (_nibble_as_float(w, 1, one) * a + c).to(tl.bfloat16)
        v2 = (_nibble_as_float(w, 2, one) * a + c).to(tl.bfloat16)
        v3 = (_nibble_as_float(w, 3, one) * a + c).to(tl.bfloat16)
        v4 = (_nibble_as_float(w, 4, one) * a + c).to(tl.bfloat16)
        v5 = (_nibble_as_float(w, 5, one) * a + c).to(tl.bfloat16)
        v6 = (_nibble_as_float(w, 6, one) * a + c).to(tl.bfloat16)
        v7 = (_nibble_as_float(w, 7, one) * a + c).to(tl.bfloat16)
        # (BN, BB*4, 2, 2, 2), the last three dims the bits 2, 1, 0 of the nibble index s
        t = tl.join(tl.join(tl.join(v0, v4), tl.join(v2, v6)), tl.join(tl.join(v1, v5), tl.join(v3, v7)))
        t = tl.permute(tl.reshape(t, (BN, BB, 4, 8)), (0, 1, 3, 2))  # (row, block, s, w)
        cols = b0 * 32 + tl.arange(0, BB * 32)  # column block*32 + 4s + w
        tl.store(out_ptr + rn[:, None] * K + cols[None, :], tl.reshape(t, (BN, BB * 32)), mask=(rn < N)[:, None])


def _largest_block_step(nblk: int, want: int) -> int:
    """Largest power of two <= want dividing the block count (the GEMV steps through K without a ragged end)."""
    bb = 1
    while bb * 2 <= want and nblk % (bb * 2) == 0:
        bb *= 2
    return bb


def gemv_config(m: int, n: int, k: int) -> dict:
    """Launch parameters for the GEMV, from the sweep on an H200 at the 7B shapes (benchmarks/results/int4_kernels.json):
    few output rows and long K split K four ways; other few-row shapes take 16-row programs of 2 warps; many rows
    32-row programs."""
    mb = 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8
    if mb > 1:
        return dict(MB=mb, BN=32, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=4, KS=1)
    if n <= 8192 and k >= 8192:
        return dict(MB=1, BN=32, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=4, KS=4)
    if n <= 8192:
        return dict(MB=1, BN=16, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=2, KS=1)
    return dict(MB=1, BN=32, BB=_largest_block_step(k // 32, 8), PREFETCH=1, num_warps=2, KS=1)


def gemv(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, **config) -> torch.Tensor:
    """y (M, N) bf16 = x (M, K) bf16 (unit column stride) @ w^T (+ bias float32), M <= 8 rows per launch (more rows:
    one launch per 8); `config` overrides gemv_config."""
    m, k = x.shape
    n = packed.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16) if out is None else out
    for r in range(0, m, 8):
        xr, yr = x[r:r + 8], y[r:r + 8]
        mr = xr.shape[0]
        cfg = gemv_config(mr, n, k) | config
        ks = cfg.get("KS", 1)
        assert mr <= cfg["MB"] <= 8 and (k // 32) % cfg["BB"] == 0 and cfg["PREFETCH"] in (1, 2), (m, k, cfg)
        assert 1 <= ks <= (k // 32) // cfg["BB"], (k, cfg)
        meta = {kk: v for kk, v in cfg.items() if kk in ("num_warps", "num_stages")}
        dst = yr if ks == 1 else torch.empty(ks, mr, n, device=x.device, dtype=torch.float32)
        _gemv_kernel[(triton.cdiv(n, cfg["BN"]), ks)](
            xr, packed.view(torch.int32), sz.view(torch.int32), bias if bias is not None else yr, dst, mr, n, k,
            xr.stride(0), k // 8, ONE_F32_BITS, GROUP=group_size, MB=cfg["MB"], BN=cfg["BN"], BB=cfg["BB"],
            HAS_BIAS=bias is not None, PREFETCH=cfg["PREFETCH"], KS=ks, **meta)
        if ks > 1:
            _split_sum_kernel[(triton.cdiv(mr * n, 1024),)](dst, bias if bias is not None else dst, yr, mr * n, n, KS=ks,
                                                            HAS_BIAS=bias is not None, BLOCK=1024, num_warps=4)
    return y


def dequantize(packed: torch.Tensor, sz: torch.Tensor, group_size: int, out: torch.Tensor | None = None, *,
               bn: int = 16, bb: int = 8, num_warps: int = 4) -> torch.Tensor:
    """bf16 weight (N, K) of a packed int4 weight, one kernel; `out` an optional (N, K) bf16 buffer."""
    n, k = packed.shape[0], packed.shape[1] * 2
    bb = _largest_block_step(k // 32, bb)
    if out is None:
        out = torch.empty(n, k, device=packed.device, dtype=torch.bfloat16)
    _dequant_kernel[(triton.cdiv(n, bn), (k // 32) // bb)](packed.view(torch.int32), sz.view(torch.int32), out, n, k,
                                                          k // 8, ONE_F32_BITS, GROUP=group_size, BN=bn, BB=bb, num_warps=num_warps)
    return out


def _linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, packed, sz, group_size, bias)
    y = F.linear(x, dequantize(packed, sz, group_size))
    return y if bias is None else y + bias.to(y.dtype)


if triton is not None:

    @torch.library.custom_op("modelcore::int4_linear", mutates_args=())
    def int4_linear_op(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None,
                       group_size: int) -> torch.Tensor:
        """y (M, N) bf16 = x (M, K) bf16 @ int4 weight^T (+ bias): the GEMV for few rows, else dequantize + GEMM."""
        return _linear(x if x.stride(-1) == 1 else x.contiguous(), packed, sz, bias, group_size)

    @int4_linear_op.register_fake
    def _(x, packed, sz, bias, group_size):
        return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.bfloat16)
