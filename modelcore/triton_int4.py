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
Decode kernels launch as programmatic dependents (pdl(), Hopper): a GEMV starts while the kernel before it finishes and
loads its first weights, then waits (griddepcontrol.wait) before reading x or writing anything; the decode norm before
a GEMV (`rms_norm`, "modelcore::rms_norm_rows") and the decode attention do the same, so each launch overlaps the tail
of the one before (7B int4 step on an H200: 2.26 ms without, 2.08 ms with).
"""
from __future__ import annotations

import functools
import os

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


PDL: bool | None = None  # programmatic dependent launch of the decode kernels; None: decided at first use (pdl())


def pdl() -> bool:
    """Launch the decode kernels (GEMV, decode attention, the norm before a GEMV) as programmatic dependents (Hopper+):
    each kernel starts while its predecessor finishes, loads its first weights, and waits (griddepcontrol.wait)
    before touching anything a kernel wrote. Off with MODELCORE_PDL=0, under Triton's interpreter, before sm_90, or
    where Triton has no launch_pdl option."""
    global PDL
    if PDL is None:
        PDL = False
        if (triton is not None and os.environ.get("MODELCORE_PDL", "1") != "0"
                and os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available()
                and torch.cuda.get_device_capability()[0] >= 9):
            try:
                from triton.backends.nvidia.compiler import CUDAOptions

                PDL = "launch_pdl" in CUDAOptions.__dataclass_fields__
            except Exception:  # noqa: BLE001 - another Triton build: plain launches
                PDL = False
    return PDL


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

    if os.environ.get("TRITON_INTERPRET") == "1":  # Triton's CPU interpreter (kernel tests without a GPU): no PTX

        @triton.jit
        def _load_i32(ptrs):
            return tl.load(ptrs)
    else:

        @triton.jit
        def _load_i32(ptrs):
            """Elementwise 4-byte load that keeps the layout of `ptrs` (a tl.load gets a coalesced layout of its own, and
            converting the scales into the weights' layout would cost a shared-memory round trip and a barrier per step)."""
            return tl.inline_asm_elementwise("ld.global.nc.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True,
                                             pack=1)

    @triton.jit
    def _pdl_wait():
        """griddepcontrol.wait: until the previous kernel of the stream has completed and its writes are visible (a
        no-op for a kernel not launched as a programmatic dependent)."""
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _pdl_launch():
        """griddepcontrol.launch_dependents: once every program of this kernel has passed it, the next kernel (if
        launched with PDL) may start and run up to its own _pdl_wait. Issued after _pdl_wait, so a kernel that starts
        early knows that everything before its predecessor has completed."""
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
                                  pack=1)

    @triton.jit
    def _load_x(xp, xoff):
        """One row's activations for a step, float32, as 8 vectors (BB*4,): vector s holds x[4s + w] of each block."""
        return (tl.load(xp + xoff).to(tl.float32), tl.load(xp + 4 + xoff).to(tl.float32),
                tl.load(xp + 8 + xoff).to(tl.float32), tl.load(xp + 12 + xoff).to(tl.float32),
                tl.load(xp + 16 + xoff).to(tl.float32), tl.load(xp + 20 + xoff).to(tl.float32),
                tl.load(xp + 24 + xoff).to(tl.float32), tl.load(xp + 28 + xoff).to(tl.float32))

    @triton.jit
    def _hi(v, one):
        """1 + code/128 for the nibble at bits 16..19 of v (exact)."""
        return ((v & 0xF0000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _lo(v, one):
        """1 + code/2048 for the nibble at bits 12..15 of v (exact; the float32 sums keep ~2^-13 of its products)."""
        return ((v & 0xF000) | one).to(tl.float32, bitcast=True)

    @triton.jit
    def _row_step(w, a, c, x0, x1, x2, x3, x4, x5, x6, x7, one, BN: tl.constexpr, BB: tl.constexpr,
                  FAST: tl.constexpr):
        """(BN, BB): sum over each block of w * x = a * sum(f * x) + c * sum(x), for one row of x.
        FAST: four shifts per word instead of seven. Even nibbles are read at bits 16..19 (f = 1 + code/128: w << 16,
        w << 8, w, w >> 8), odd ones at bits 12..15 (f = 1 + code/2048: w << 8, w, w >> 8, w >> 16), so
        sum(code * x) = 128 (P - sum(x) - 15 sum(x_odd)) with P = sum(f_even x) + 16 sum(f_odd x)."""
        xs = ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7))
        q = tl.sum(tl.reshape(tl.broadcast_to(xs[None, :], (BN, BB * 4)), (BN, BB, 4)), axis=2)
        if FAST:
            wl = w << 8
            wr = w >> 8  # arithmetic shifts: the sign bits land above the bits read
            ph = _hi(w << 16, one) * x0[None, :]
            pl = _lo(wl, one) * x1[None, :]
            ph = ph + _hi(wl, one) * x2[None, :]
            pl = pl + _lo(w, one) * x3[None, :]
            ph = ph + _hi(w, one) * x4[None, :]
            pl = pl + _lo(wr, one) * x5[None, :]
            ph = ph + _hi(wr, one) * x6[None, :]
            pl = pl + _lo(w >> 16, one) * x7[None, :]
            p = tl.sum(tl.reshape(ph + 16.0 * pl, (BN, BB, 4)), axis=2)
            xo = (x1 + x3) + (x5 + x7)
            qo = tl.sum(tl.reshape(tl.broadcast_to(xo[None, :], (BN, BB * 4)), (BN, BB, 4)), axis=2)
            return a * (p - 15.0 * qo) + c * q
        part = _nibble_as_float(w, 0, one) * x0[None, :]  # one FMA per nibble: a chain, not a tree
        part = part + _nibble_as_float(w, 1, one) * x1[None, :]
        part = part + _nibble_as_float(w, 2, one) * x2[None, :]
        part = part + _nibble_as_float(w, 3, one) * x3[None, :]
        part = part + _nibble_as_float(w, 4, one) * x4[None, :]
        part = part + _nibble_as_float(w, 5, one) * x5[None, :]
        part = part + _nibble_as_float(w, 6, one) * x6[None, :]
        part = part + _nibble_as_float(w, 7, one) * x7[None, :]
        p = tl.sum(tl.reshape(part, (BN, BB, 4)), axis=2)  # the 4 words of a block are in one thread
        return a * p + c * q

    @triton.jit
    def _other_row(w, a, c, xp, xoff, one, BN: tl.constexpr, BB: tl.constexpr, FAST: tl.constexpr):
        x0, x1, x2, x3, x4, x5, x6, x7 = _load_x(xp, xoff)
        return _row_step(w, a, c, x0, x1, x2, x3, x4, x5, x6, x7, one, BN, BB, FAST)

    @triton.jit
    def _scale_terms(sz):
        """a = 128 scale, c = zero - 136 scale from the (scale, zero) bf16 pair read as one int32."""
        sc = (sz << 16).to(tl.float32, bitcast=True)
        zr = (sz & -65536).to(tl.float32, bitcast=True)
        return 128.0 * sc, zr - 136.0 * sc

    @triton.jit
    def _store_row(y_ptr, v, bias, r_ptr, m, M, rn, nmask, N, stride_rm, HAS_RES: tl.constexpr):
        """Row m of y (bf16): the row's sums v (BN,) + bias (+ residual row m), rounded once."""
        v = v + bias
        if HAS_RES:
            v += tl.load(r_ptr + m * stride_rm + rn, mask=nmask & (M > m), other=0.0).to(tl.float32)
        tl.store(y_ptr + m * N + rn, v.to(tl.bfloat16), mask=nmask & (M > m))

    @triton.jit
    def _split_total(ws_ptr, off, kstride, mask, KS, KSP: tl.constexpr):
        """Sum over the KS (<= KSP, a power of two) partials at ws_ptr + k * kstride + off: all loaded at once (from
        L2: other programs wrote them), then added in a fixed tree order (deterministic). A loop of KS dependent
        loads cost KS L2 round trips at the end of every split-K launch."""
        k = tl.arange(0, KSP)
        v = tl.load(ws_ptr + k[:, None] * kstride + off[None, :], mask=(k[:, None] < KS) & mask[None, :], other=0.0,
                    cache_modifier=".cg")
        return tl.sum(v, axis=0)

    @triton.jit
    def _store_gated(y_ptr, g, u, b_ptr, r_ptr, rn, rnc, nmask, N, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
        """y = silu(g + bias) * (u + bias') (+ residual), rounded once."""
        if HAS_BIAS:
            g += tl.load(b_ptr + rnc)
            u += tl.load(b_ptr + N + rnc)
        v = g / (1.0 + tl.exp(-g)) * u
        if HAS_RES:
            v += tl.load(r_ptr + rn, mask=nmask, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, v.to(tl.bfloat16), mask=nmask)

    @triton.jit
    def _store_first_row(y_ptr, v, vu, b_ptr, r_ptr, rn, rnc, nmask, N, M, stride_rm, BN: tl.constexpr,
                         GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
        """Row 0 of y from its sums v (BN,) (+ bias) (+ residual); GATED: silu(v + bias) * (vu + bias'). Returns the
        bias (BN,) float32 for the tile's other rows."""
        bias = tl.zeros((BN,), dtype=tl.float32)
        if GATED:
            _store_gated(y_ptr, v, vu, b_ptr, r_ptr, rn, rnc, nmask, N, HAS_BIAS, HAS_RES)
        else:
            if HAS_BIAS:
                bias = tl.load(b_ptr + rnc)
            _store_row(y_ptr, v, bias, r_ptr, 0, M, rn, nmask, N, stride_rm, HAS_RES)
        return bias

    @triton.jit
    def _finish_first_row(y_ptr, ws_ptr, b_ptr, r_ptr, rn, rnc, nmask, N, M, kst, stride_rm, KS, KSP: tl.constexpr,
                          BN: tl.constexpr, GATED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
        """The last program of a split-K row tile: row 0 of y from the KS partials (kst apart); returns the bias."""
        v = _split_total(ws_ptr, rn, kst, nmask, KS, KSP)
        vu = v
        if GATED:
            vu = _split_total(ws_ptr, rn + N, kst, nmask, KS, KSP)
        return _store_first_row(y_ptr, v, vu, b_ptr, r_ptr, rn, rnc, nmask, N, M, stride_rm, BN, GATED, HAS_BIAS,
                                HAS_RES)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, sz_ptr, b_ptr, r_ptr, y_ptr, ws_ptr, cnt_ptr, M, N, NW, K, stride_xm, stride_wn,
                     stride_rm, one, KS,
                     GROUP: tl.constexpr, MB: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr,
                     HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr, SPLIT: tl.constexpr, GATED: tl.constexpr,
                     HAS_RES: tl.constexpr, FAST: tl.constexpr, SEM: tl.constexpr, KSP: tl.constexpr,
                     PDL: tl.constexpr):
        """y (M, N) = x (M, K) @ w^T for M <= MB (1, 2, 4 or 8): program pid takes output rows [pid*BN, +BN) over
        all of K, BB blocks (BB * 16 bytes of each row) per step; the weights are read once for all M rows. The next
        step's weights, scales and first row of x load while a step computes (weights PREFETCH steps ahead).
        NW: rows of the weight (the scales' row stride). GATED (MB = 1): the weight is [gate; up]
        (NW = 2N) and y = silu(x @ gate^T + b) * (x @ up^T + b'), each program reading its rows of both halves.
        HAS_RES: y += r (M, N) before the rounding.
        SPLIT (KS > 1): program (pid, k) takes the k-th of KS ranges of steps and stores float32 partial sums (KS, M, NW) to
        ws_ptr. SEM: then it counts itself in at cnt_ptr[pid] (acq_rel atomic after a barrier), and the last of the
        KS programs of the row tile adds the partials up in order (deterministic), finishes y and resets the counter
        to 0; else _split_sum_kernel adds them up in a second launch."""
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        rnc = tl.minimum(rn, N - 1)  # clamped rows: unmasked loads; the stores are masked
        j = tl.arange(0, BB * 4)  # word j of a step: block j // 4, word j % 4
        xoff = (j // 4) * 32 + (j % 4)
        rb = tl.arange(0, BB)
        wp = w_ptr + rnc[:, None] * stride_wn + j[None, :]  # (BN, BB*4) int32
        szp = sz_ptr + rnc[:, None]
        wpu = wp + N * stride_wn  # GATED: the up half's rows
        szpu = szp + N
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
        accu = tl.zeros((BN, BB), dtype=tl.float32)
        steps = K // 32 // BB
        first = (tl.program_id(1) * steps // KS) * BB  # this program's blocks [first, end)
        end = ((tl.program_id(1) + 1) * steps // KS) * BB
        w = tl.load(wp + first * 4, eviction_policy="evict_first")
        if PREFETCH == 2:
            w1 = tl.load(wp + tl.minimum(first + BB, end - BB) * 4, eviction_policy="evict_first")
        sz = _load_i32(szp + ((first + rb) // (GROUP // 32))[None, :] * NW)  # (BN, BB): bf16 scale (low), zero (high)
        wu = w
        szu = sz
        if GATED:
            wu = tl.load(wpu + first * 4, eviction_policy="evict_first")
            if PREFETCH == 2:
                wu1 = tl.load(wpu + tl.minimum(first + BB, end - BB) * 4, eviction_policy="evict_first")
            szu = _load_i32(szpu + ((first + rb) // (GROUP // 32))[None, :] * NW)
        if PDL:  # launched as a programmatic dependent: the weights above load while the previous kernel finishes
            _pdl_wait()  # everything below (x, residual, workspace, counters, y) after the previous kernel completed
            _pdl_launch()
        y0, y1, y2, y3, y4, y5, y6, y7 = _load_x(x_ptr + first * 32, xoff)
        for b0 in range(first, end, BB):
            nb = tl.minimum(b0 + BB, end - BB)  # the next step (the last step reloads itself)
            w_next = tl.load(wp + tl.minimum(b0 + PREFETCH * BB, end - BB) * 4, eviction_policy="evict_first")
            sz_next = _load_i32(szp + ((nb + rb) // (GROUP // 32))[None, :] * NW)
            if GATED:
                wu_next = tl.load(wpu + tl.minimum(b0 + PREFETCH * BB, end - BB) * 4, eviction_policy="evict_first")
                szu_next = _load_i32(szpu + ((nb + rb) // (GROUP // 32))[None, :] * NW)
            n0, n1, n2, n3, n4, n5, n6, n7 = _load_x(x_ptr + nb * 32, xoff)
            a, c = _scale_terms(sz)
            xo = b0 * 32
            acc0 += _row_step(w, a, c, y0, y1, y2, y3, y4, y5, y6, y7, one, BN, BB, FAST)
            if GATED:
                au, cu = _scale_terms(szu)
                accu += _row_step(wu, au, cu, y0, y1, y2, y3, y4, y5, y6, y7, one, BN, BB, FAST)
                if PREFETCH == 2:
                    wu = wu1
                    wu1 = wu_next
                else:
                    wu = wu_next
                szu = szu_next
            if MB > 1:
                acc1 += _other_row(w, a, c, x1 + xo, xoff, one, BN, BB, FAST)
            if MB > 2:
                acc2 += _other_row(w, a, c, x2 + xo, xoff, one, BN, BB, FAST)
                acc3 += _other_row(w, a, c, x3 + xo, xoff, one, BN, BB, FAST)
            if MB > 4:
                acc4 += _other_row(w, a, c, x4 + xo, xoff, one, BN, BB, FAST)
                acc5 += _other_row(w, a, c, x5 + xo, xoff, one, BN, BB, FAST)
                acc6 += _other_row(w, a, c, x6 + xo, xoff, one, BN, BB, FAST)
                acc7 += _other_row(w, a, c, x7 + xo, xoff, one, BN, BB, FAST)
            if PREFETCH == 2:
                w = w1
                w1 = w_next
            else:
                w = w_next
            sz = sz_next
            y0, y1, y2, y3, y4, y5, y6, y7 = n0, n1, n2, n3, n4, n5, n6, n7
        nmask = rn < N
        if SPLIT:  # float32 partial sums, row m of split k at ws_ptr + (k * M + m) * NW (GATED: up at + N)
            yp = ws_ptr + tl.program_id(1) * M * NW + rn
            tl.store(yp, tl.sum(acc0, axis=1), mask=nmask)
            if GATED:
                tl.store(yp + N, tl.sum(accu, axis=1), mask=nmask)
            if MB > 1:
                tl.store(yp + NW, tl.sum(acc1, axis=1), mask=nmask & (M > 1))
            if MB > 2:
                tl.store(yp + 2 * NW, tl.sum(acc2, axis=1), mask=nmask & (M > 2))
                tl.store(yp + 3 * NW, tl.sum(acc3, axis=1), mask=nmask & (M > 3))
            if MB > 4:
                tl.store(yp + 4 * NW, tl.sum(acc4, axis=1), mask=nmask & (M > 4))
                tl.store(yp + 5 * NW, tl.sum(acc5, axis=1), mask=nmask & (M > 5))
                tl.store(yp + 6 * NW, tl.sum(acc6, axis=1), mask=nmask & (M > 6))
                tl.store(yp + 7 * NW, tl.sum(acc7, axis=1), mask=nmask & (M > 7))
            if SEM:
                tl.debug_barrier()  # every thread's partials stored before the release below
                arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
                if arrived == KS - 1:  # the last program of this row tile
                    kst = M * NW
                    bias = _finish_first_row(y_ptr, ws_ptr, b_ptr, r_ptr, rn, rnc, nmask, N, M, kst, stride_rm, KS, KSP,
                                             BN, GATED, HAS_BIAS, HAS_RES)
                    if not GATED:
                        if MB > 1:
                            _store_row(y_ptr, _split_total(ws_ptr, NW + rn, kst, nmask & (M > 1), KS, KSP), bias, r_ptr, 1,
                                       M, rn, nmask, N, stride_rm, HAS_RES)
                        if MB > 2:
                            _store_row(y_ptr, _split_total(ws_ptr, 2 * NW + rn, kst, nmask & (M > 2), KS, KSP), bias, r_ptr,
                                       2, M, rn, nmask, N, stride_rm, HAS_RES)
                            _store_row(y_ptr, _split_total(ws_ptr, 3 * NW + rn, kst, nmask & (M > 3), KS, KSP), bias, r_ptr,
                                       3, M, rn, nmask, N, stride_rm, HAS_RES)
                        if MB > 4:
                            _store_row(y_ptr, _split_total(ws_ptr, 4 * NW + rn, kst, nmask & (M > 4), KS, KSP), bias, r_ptr,
                                       4, M, rn, nmask, N, stride_rm, HAS_RES)
                            _store_row(y_ptr, _split_total(ws_ptr, 5 * NW + rn, kst, nmask & (M > 5), KS, KSP), bias, r_ptr,
                                       5, M, rn, nmask, N, stride_rm, HAS_RES)
                            _store_row(y_ptr, _split_total(ws_ptr, 6 * NW + rn, kst, nmask & (M > 6), KS, KSP), bias, r_ptr,
                                       6, M, rn, nmask, N, stride_rm, HAS_RES)
                            _store_row(y_ptr, _split_total(ws_ptr, 7 * NW + rn, kst, nmask & (M > 7), KS, KSP), bias, r_ptr,
                                       7, M, rn, nmask, N, stride_rm, HAS_RES)
                    tl.atomic_xchg(cnt_ptr + pid, 0)  # ready for the next launch
        else:
            bias = _store_first_row(y_ptr, tl.sum(acc0, axis=1), tl.sum(accu, axis=1), b_ptr, r_ptr, rn, rnc, nmask, N,
                                    M, stride_rm, BN, GATED, HAS_BIAS, HAS_RES)
            if MB > 1:  # (MB > 1: not GATED)
                _store_row(y_ptr, tl.sum(acc1, axis=1), bias, r_ptr, 1, M, rn, nmask, N, stride_rm, HAS_RES)
            if MB > 2:
                _store_row(y_ptr, tl.sum(acc2, axis=1), bias, r_ptr, 2, M, rn, nmask, N, stride_rm, HAS_RES)
                _store_row(y_ptr, tl.sum(acc3, axis=1), bias, r_ptr, 3, M, rn, nmask, N, stride_rm, HAS_RES)
            if MB > 4:
                _store_row(y_ptr, tl.sum(acc4, axis=1), bias, r_ptr, 4, M, rn, nmask, N, stride_rm, HAS_RES)
                _store_row(y_ptr, tl.sum(acc5, axis=1), bias, r_ptr, 5, M, rn, nmask, N, stride_rm, HAS_RES)
                _store_row(y_ptr, tl.sum(acc6, axis=1), bias, r_ptr, 6, M, rn, nmask, N, stride_rm, HAS_RES)
                _store_row(y_ptr, tl.sum(acc7, axis=1), bias, r_ptr, 7, M, rn, nmask, N, stride_rm, HAS_RES)

    @triton.jit
    def _split_sum_kernel(part_ptr, b_ptr, r_ptr, y_ptr, MN, N, stride_rm, KS, HAS_BIAS: tl.constexpr,
                          HAS_RES: tl.constexpr, GATED: tl.constexpr, BLOCK: tl.constexpr):
        """y (M*N,) bf16 = sum over KS of the partials (KS, M, NW) float32 (+ bias) (+ residual (M, N)); GATED
        (NW = 2N): y = silu(gate sums) * (up sums)."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < MN
        m = i // N
        n = i % N
        if GATED:
            pi = m * 2 * N + n
            acc = tl.load(part_ptr + pi, mask=mask, other=0.0)
            up = tl.load(part_ptr + pi + N, mask=mask, other=0.0)
            for k in range(1, KS):
                acc += tl.load(part_ptr + k * 2 * MN + pi, mask=mask, other=0.0)
                up += tl.load(part_ptr + k * 2 * MN + pi + N, mask=mask, other=0.0)
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=mask, other=0.0)
                up += tl.load(b_ptr + N + n, mask=mask, other=0.0)
            acc = acc / (1.0 + tl.exp(-acc)) * up
        else:
            acc = tl.load(part_ptr + i, mask=mask, other=0.0)
            for k in range(1, KS):
                acc += tl.load(part_ptr + k * MN + i, mask=mask, other=0.0)
            if HAS_BIAS:
                acc += tl.load(b_ptr + n, mask=mask, other=0.0)
        if HAS_RES:
            acc += tl.load(r_ptr + m * stride_rm + n, mask=mask, other=0.0).to(tl.float32)
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


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, stride_x, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Row pid of y = x * rsqrt(mean(x^2) + eps) * w in float32, rounded once (F.rms_norm's maths)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # a parameter: loads before the wait
        if PDL:
            _pdl_wait()
            _pdl_launch()  # the GEMV after it starts now and streams its first weights while this row reduces
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        tl.store(y_ptr + row * D + cols, (x * rs * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl_launch: bool | None = None) -> torch.Tensor:
    """RMSNorm of the rows of x (M, D) (16-bit, unit column stride) with weight (D,) in x's dtype: one program per row,
    launched as a programmatic dependent (see pdl()) so the int4 GEMV that reads it can start early. For decode
    (a few rows); twin: F.rms_norm."""
    m, d = x.shape
    y = torch.empty(m, d, device=x.device, dtype=x.dtype)
    if m == 0:
        return y
    on = pdl() and pdl_launch is not False
    _rms_norm_kernel[(m,)](x, weight, y, d, x.stride(0), eps, BLOCK=triton.next_power_of_2(d), PDL=on,
                           num_warps=4 if d <= 4096 else 8, **({"launch_pdl": True} if on else {}))
    return y


def _largest_block_step(nblk: int, want: int) -> int:
    """Largest power of two <= want dividing the block count (the GEMV steps through K without a ragged end)."""
    bb = 1
    while bb * 2 <= want and nblk % (bb * 2) == 0:
        bb *= 2
    return bb


# Per-shape launch parameters from the sweep (benchmarks/gpu_int4_decode.py): (rows of x bucket, weight rows, K, gated).
# maxnreg: a register cap for ptxas (more programs resident per SM); PDL: False for a plain launch.
TUNED: dict[tuple[int, int, int, bool], dict] = {
    (1, 4608, 3584, False): dict(BN=16, BB=8, PREFETCH=1, num_warps=1, KS=7, FAST=True, maxnreg=128),  # 7B qkv (+ bias)
    (1, 3584, 3584, False): dict(BN=16, BB=16, PREFETCH=1, num_warps=2, KS=1),  # 7B o (+ residual)
    (1, 37888, 3584, True): dict(BN=8, BB=16, PREFETCH=1, num_warps=2, KS=1),  # 7B gate_up, gated
    (1, 3584, 18944, False): dict(BN=16, BB=8, PREFETCH=1, num_warps=1, KS=10, maxnreg=96),  # 7B down (+ residual)
    (1, 152064, 3584, False): dict(BN=32, BB=8, PREFETCH=1, num_warps=2, KS=1, FAST=True),  # 7B head
}


def gemv_config(m: int, n: int, k: int, *, gated: bool = False) -> dict:
    """Launch parameters for the GEMV, from the sweep on an H200 at the 7B shapes (benchmarks/results/int4_kernels.json):
    few output rows and long K split K four ways; other few-row shapes take 16-row programs of 2 warps; many rows
    32-row programs. n counts the weight's rows; gated programs take BN rows of each half."""
    mb = 1 if m <= 1 else 2 if m <= 2 else 4 if m <= 4 else 8
    tuned = TUNED.get((mb, n, k, gated))
    if tuned is not None and (k // 32) % tuned["BB"] == 0:
        return dict(tuned, MB=mb)
    if mb > 1:
        cfg = dict(MB=mb, BN=32, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=4, KS=1)
    elif n <= 8192 and k >= 8192:
        cfg = dict(MB=1, BN=32, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=4, KS=4)
    elif n <= 8192:
        cfg = dict(MB=1, BN=16, BB=_largest_block_step(k // 32, 16), PREFETCH=1, num_warps=2, KS=1)
    else:
        cfg = dict(MB=1, BN=32, BB=_largest_block_step(k // 32, 8), PREFETCH=1, num_warps=2, KS=1)
    if gated:
        cfg["BN"] = max(8, cfg["BN"] // 2)
    return cfg


_COUNTERS = 1 << 16  # row tiles a split-K launch may count in (int32 counters, left at zero by every launch)


def _counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters for split-K launches on `device`'s current stream (kernels on one stream run in order and
    each leaves its counters at zero; one buffer per stream, so launches on concurrent streams never share one)."""
    stream = torch.cuda.current_stream(device)
    return _stream_counters(stream.device_index, stream.cuda_stream)


@functools.lru_cache(maxsize=64)
def _stream_counters(device_index: int, stream: int) -> torch.Tensor:
    return torch.zeros(_COUNTERS, device=torch.device("cuda", device_index), dtype=torch.int32)


def gemv(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
         out: torch.Tensor | None = None, *, residual: torch.Tensor | None = None, gated: bool = False,
         **config) -> torch.Tensor:
    """y (M, N) bf16 = x (M, K) bf16 (unit column stride) @ w^T (+ bias float32) (+ residual (M, N), unit column
    stride), M <= 8 rows per launch (more rows: one launch per 8); gated (M = 1): w = [gate; up] (2N rows) and
    y = silu(x @ gate^T) * (x @ up^T) (biases of both halves added first). `config` overrides gemv_config."""
    m, k = x.shape
    nw = packed.shape[0]
    n = nw // 2 if gated else nw
    assert not gated or m == 1, "the gated GEMV takes one row"
    assert residual is None or (residual.shape == (m, n) and residual.stride(1) == 1), "residual (M, N), unit stride"
    y = torch.empty(m, n, device=x.device, dtype=torch.bfloat16) if out is None else out
    for r in range(0, m, 8):
        xr, yr = x[r:r + 8], y[r:r + 8]
        rr = residual[r:r + 8] if residual is not None else None
        mr = xr.shape[0]
        cfg = gemv_config(mr, nw, k, gated=gated) | config
        ks = cfg.get("KS", 1)
        assert mr <= cfg["MB"] <= 8 and (k // 32) % cfg["BB"] == 0 and cfg["PREFETCH"] in (1, 2), (m, k, cfg)
        assert 1 <= ks <= (k // 32) // cfg["BB"], (k, cfg)
        assert not gated or cfg["MB"] == 1, cfg
        meta = {kk: v for kk, v in cfg.items() if kk in ("num_warps", "num_stages", "maxnreg") and v}
        tiles = triton.cdiv(n, cfg["BN"])
        ws = yr if ks == 1 else torch.empty(ks, mr, nw, device=x.device, dtype=torch.float32)
        sem = ks > 1 and cfg.get("SEM", True) and tiles <= _COUNTERS
        cnt = _counters(x.device) if sem else ws
        on = pdl() and cfg.get("PDL", True)
        _gemv_kernel[(tiles, ks)](
            xr, packed.view(torch.int32), sz.view(torch.int32), bias if bias is not None else yr,
            rr if rr is not None else yr, yr, ws, cnt, mr, n, nw, k, xr.stride(0), k // 8,
            rr.stride(0) if rr is not None else 0, ONE_F32_BITS, ks, GROUP=group_size, MB=cfg["MB"], BN=cfg["BN"],
            BB=cfg["BB"], HAS_BIAS=bias is not None, PREFETCH=cfg["PREFETCH"], SPLIT=ks > 1, GATED=gated,
            HAS_RES=rr is not None, FAST=bool(cfg.get("FAST", False)), SEM=sem, KSP=triton.next_power_of_2(ks),
            PDL=on, **meta, **({"launch_pdl": True} if on else {}))
        if ks > 1 and not sem:
            dst = ws
            _split_sum_kernel[(triton.cdiv(mr * n, 1024),)](
                dst, bias if bias is not None else dst, rr if rr is not None else dst, yr, mr * n, n,
                rr.stride(0) if rr is not None else 0, ks, HAS_BIAS=bias is not None, HAS_RES=rr is not None,
                GATED=gated, BLOCK=1024, num_warps=4)
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


def _linear(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None, group_size: int,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    if x.shape[0] <= GEMV_MAX_ROWS:
        return gemv(x, packed, sz, group_size, bias, residual=residual)
    w = dequantize(packed, sz, group_size)
    if residual is not None and bias is None:  # the residual as the GEMM's accumulator input: no extra pass
        return torch.addmm(residual.to(w.dtype), x, w.t())
    y = F.linear(x, w, None if bias is None else bias.to(w.dtype))  # bias in the GEMM's epilogue
    return y if residual is None else y + residual.to(y.dtype)


def _gate_up_silu(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None,
                  group_size: int) -> torch.Tensor:
    from modelcore.triton_mlp import silu_mul

    if x.shape[0] == 1:
        return gemv(x, packed, sz, group_size, bias, gated=True)
    if x.shape[0] <= GEMV_MAX_ROWS:
        return silu_mul(gemv(x, packed, sz, group_size, bias))
    w = dequantize(packed, sz, group_size)
    return silu_mul(F.linear(x, w, None if bias is None else bias.to(w.dtype)))


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


if triton is not None:

    @torch.library.custom_op("modelcore::int4_linear", mutates_args=())
    def int4_linear_op(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None,
                       group_size: int, residual: torch.Tensor | None = None) -> torch.Tensor:
        """y (M, N) bf16 = x (M, K) bf16 @ int4 weight^T (+ bias) (+ residual (M, N)): the GEMV for few rows, else
        dequantize + GEMM."""
        return _linear(_unit_stride(x), packed, sz, bias, group_size, None if residual is None else _unit_stride(residual))

    @int4_linear_op.register_fake
    def _(x, packed, sz, bias, group_size, residual=None):
        return x.new_empty(x.shape[0], packed.shape[0], dtype=torch.bfloat16)

    @torch.library.custom_op("modelcore::int4_gate_up_silu", mutates_args=())
    def int4_gate_up_silu_op(x: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, bias: torch.Tensor | None,
                             group_size: int) -> torch.Tensor:
        """h (M, N/2) bf16 = silu(x @ gate^T) * (x @ up^T) for a fused [gate; up] int4 weight (N rows): one gated
        GEMV for one row, else the GEMV or dequantize + GEMM, then modelcore/triton_mlp.py's silu_mul."""
        return _gate_up_silu(_unit_stride(x), packed, sz, bias, group_size)

    @int4_gate_up_silu_op.register_fake
    def _(x, packed, sz, bias, group_size):
        return x.new_empty(x.shape[0], packed.shape[0] // 2, dtype=torch.bfloat16)

    @torch.library.custom_op("modelcore::rms_norm_rows", mutates_args=())
    def rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """rms_norm (above) as one opaque op for torch.compile'd blocks and CUDA graphs."""
        return rms_norm(_unit_stride(x), weight, eps)

    @rms_norm_op.register_fake
    def _(x, weight, eps):
        return x.new_empty(x.shape)


# Decode with int8 activations ("q8"): for one row of x feeding a CUDA int4 linear straight from a norm, the norm kernel
# also writes x quantized to int8 per 32-column block (scale d = max|x| / 127), bytes ordered like the weight's nibbles,
# and the GEMV multiplies 4-bit codes by 8-bit activations with dp4a (4 products and a sum in one instruction) instead of
# turning every nibble into a float: ~30 instructions per 32 weights of a row instead of ~100, which is what bounded the
# gate/up GEMV (~2.7 TB/s, see the README). llama.cpp's CUDA decode (q8_1 activations) and our CPU kernel do the same.
# Per block of x (row m): words 8b + 4h + w, byte q of word (h, w) = int8 of x[32b + 8q + 4h + w] (h = 0: the low
# nibbles of the weight's word w, h = 1: the high ones), and stats (3, K/32) float32: d, 8 * sum(q), sum(x).
# sum over a block of w * x = s * d * (sum(code * q) - 8 sum(q)) + z * sum(x), s and z the weight group's scale and zero.
Q8 = os.environ.get("MODELCORE_GPU_Q8", "1") != "0"  # norm -> int4 GEMV of one row through int8 activations

if triton is not None:
    if os.environ.get("TRITON_INTERPRET") == "1":

        @triton.jit
        def _dp4a(a, b, c):
            """c + sum over the 4 bytes of (unsigned byte of a) * (signed byte of b) (the interpreter's twin)."""
            c += (a & 0xFF) * ((b << 24) >> 24)
            c += ((a >> 8) & 0xFF) * ((b << 16) >> 24)
            c += ((a >> 16) & 0xFF) * ((b << 8) >> 24)
            c += ((a >> 24) & 0xFF) * (b >> 24)
            return c
    else:

        @triton.jit
        def _dp4a(a, b, c):
            """c + sum over the 4 bytes of (unsigned byte of a) * (signed byte of b): one dp4a."""
            return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32,
                                             is_pure=True, pack=1)

    @triton.jit
    def _rms_norm_q8_kernel(x_ptr, w_ptr, y_ptr, xq_ptr, st_ptr, D, eps, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One row: y = rms_norm(x) * w (bf16, as _rms_norm_kernel), and y quantized for the q8 GEMV (layout above):
        the int8 words at xq_ptr, the block stats at st_ptr. D a multiple of 32."""
        NB: tl.constexpr = BLOCK // 32
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        if PDL:
            _pdl_wait()
            _pdl_launch()
        x = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rs = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)
        yb = (x * rs * w).to(tl.bfloat16)
        tl.store(y_ptr + cols, yb, mask=mask)
        v = tl.reshape(yb.to(tl.float32), (NB, 32))  # the rounded values, what the float GEMV would read
        amax = tl.max(tl.abs(v), axis=1)
        inv = tl.where(amax > 0, 127.0 / amax, 0.0)
        q = tl.floor(v * inv[:, None] + 0.5).to(tl.int32)  # -127..127
        qsum = tl.sum(q, axis=1)
        shift = 8 * tl.arange(0, 4)
        words = tl.sum((tl.reshape(q, (NB, 4, 8)) & 0xFF) << shift[None, :, None], axis=1)  # (NB, 8): disjoint bytes
        b = tl.arange(0, NB)
        bmask = b < D // 32
        wi = b[:, None] * 8 + tl.arange(0, 8)[None, :]
        tl.store(xq_ptr + wi, words, mask=bmask[:, None])
        tl.store(st_ptr + b, amax / 127.0, mask=bmask)
        tl.store(st_ptr + D // 32 + b, 8.0 * qsum.to(tl.float32), mask=bmask)
        tl.store(st_ptr + 2 * (D // 32) + b, tl.sum(v, axis=1), mask=bmask)

    @triton.jit
    def _q8_step(w, sz, xl, xh, d, q8, xs, BN: tl.constexpr, BB: tl.constexpr):
        """(BN, BB): each block's sum of w * x for one step, from the weight words w (BN, BB*4), the (scale, zero) pairs
        sz (BN, BB), the activation words xl, xh (BB*4,) and the block stats d, q8, xs (BB,)."""
        t = _dp4a(w & 0x0F0F0F0F, tl.broadcast_to(xl[None, :], (BN, BB * 4)), tl.zeros((BN, BB * 4), dtype=tl.int32))
        t = _dp4a((w >> 4) & 0x0F0F0F0F, tl.broadcast_to(xh[None, :], (BN, BB * 4)), t)
        isum = tl.sum(tl.reshape(t, (BN, BB, 4)), axis=2).to(tl.float32)  # the 4 words of a block are in one thread
        sc = (sz << 16).to(tl.float32, bitcast=True)
        zr = (sz & -65536).to(tl.float32, bitcast=True)
        return sc * d[None, :] * (isum - q8[None, :]) + zr * xs[None, :]

    @triton.jit
    def _gemv_q8_kernel(xq_ptr, st_ptr, w_ptr, sz_ptr, b_ptr, y_ptr, ws_ptr, cnt_ptr, N, NW, K, stride_wn, KS,
                        GROUP: tl.constexpr, BN: tl.constexpr, BB: tl.constexpr, HAS_BIAS: tl.constexpr,
                        SPLIT: tl.constexpr, GATED: tl.constexpr, SEM: tl.constexpr, KSP: tl.constexpr,
                        PDL: tl.constexpr):
        """y (1, N) = x @ w^T for one row of x given as int8 words and block stats (the layout above); otherwise as
        _gemv_kernel with MB = 1 and PREFETCH = 1: BN output rows per program, BB blocks per step, GATED (y =
        silu(gate) * up), SPLIT over KS programs (partials added by the row tile's last program, SEM only)."""
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        rnc = tl.minimum(rn, N - 1)
        j = tl.arange(0, BB * 4)
        rb = tl.arange(0, BB)
        xo = (j // 4) * 8 + (j % 4)  # the low-nibble activation word of weight word j (the high one at + 4)
        wp = w_ptr + rnc[:, None] * stride_wn + j[None, :]
        szp = sz_ptr + rnc[:, None]
        wpu = wp + N * stride_wn
        szpu = szp + N
        nbk = K // 32
        steps = nbk // BB
        first = (tl.program_id(1) * steps // KS) * BB
        end = ((tl.program_id(1) + 1) * steps // KS) * BB
        w = tl.load(wp + first * 4, eviction_policy="evict_first")
        sz = _load_i32(szp + ((first + rb) // (GROUP // 32))[None, :] * NW)
        wu = w
        szu = sz
        if GATED:
            wu = tl.load(wpu + first * 4, eviction_policy="evict_first")
            szu = _load_i32(szpu + ((first + rb) // (GROUP // 32))[None, :] * NW)
        if PDL:
            _pdl_wait()
            _pdl_launch()
        xl = tl.load(xq_ptr + first * 8 + xo)
        xh = tl.load(xq_ptr + first * 8 + 4 + xo)
        d = tl.load(st_ptr + first + rb)
        q8 = tl.load(st_ptr + nbk + first + rb)
        xs = tl.load(st_ptr + 2 * nbk + first + rb)
        acc = tl.zeros((BN, BB), dtype=tl.float32)
        accu = tl.zeros((BN, BB), dtype=tl.float32)
        for b0 in range(first, end, BB):
            nb = tl.minimum(b0 + BB, end - BB)  # the next step (the last step reloads itself)
            w_next = tl.load(wp + nb * 4, eviction_policy="evict_first")
            sz_next = _load_i32(szp + ((nb + rb) // (GROUP // 32))[None, :] * NW)
            if GATED:
                wu_next = tl.load(wpu + nb * 4, eviction_policy="evict_first")
                szu_next = _load_i32(szpu + ((nb + rb) // (GROUP // 32))[None, :] * NW)
            xl_n = tl.load(xq_ptr + nb * 8 + xo)
            xh_n = tl.load(xq_ptr + nb * 8 + 4 + xo)
            d_n = tl.load(st_ptr + nb + rb)
            q8_n = tl.load(st_ptr + nbk + nb + rb)
            xs_n = tl.load(st_ptr + 2 * nbk + nb + rb)
            acc += _q8_step(w, sz, xl, xh, d, q8, xs, BN, BB)
            if GATED:
                accu += _q8_step(wu, szu, xl, xh, d, q8, xs, BN, BB)
                wu = wu_next
                szu = szu_next
            w = w_next
            sz = sz_next
            xl, xh, d, q8, xs = xl_n, xh_n, d_n, q8_n, xs_n
        nmask = rn < N
        if SPLIT:
            yp = ws_ptr + tl.program_id(1) * NW + rn
            tl.store(yp, tl.sum(acc, axis=1), mask=nmask)
            if GATED:
                tl.store(yp + N, tl.sum(accu, axis=1), mask=nmask)
            if SEM:
                tl.debug_barrier()
                arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
                if arrived == KS - 1:
                    _finish_first_row(y_ptr, ws_ptr, b_ptr, y_ptr, rn, rnc, nmask, N, 1, NW, 0, KS, KSP, BN, GATED,
                                      HAS_BIAS, False)
                    tl.atomic_xchg(cnt_ptr + pid, 0)
        else:
            _store_first_row(y_ptr, tl.sum(acc, axis=1), tl.sum(accu, axis=1), b_ptr, y_ptr, rn, rnc, nmask, N, 1, 0,
                             BN, GATED, HAS_BIAS, False)


def q8_supported(k: int, group_size: int) -> bool:
    """Shapes the q8 path takes: whole 32-column blocks, groups of whole blocks, one norm program over the row."""
    return supports(k, k, group_size) and k <= 16384


def rms_norm_q8(x: torch.Tensor, weight: torch.Tensor, eps: float, *,
                pdl_launch: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One row x (1, D) bf16: (y = RMSNorm(x) * weight (1, D) bf16, its int8 words (D/4,) int32, block stats (3, D/32)
    float32), one kernel; twin: quantize_q8_reference(F.rms_norm(...))."""
    m, d = x.shape
    assert m == 1 and d % 32 == 0, (m, d)
    y = torch.empty(1, d, device=x.device, dtype=x.dtype)
    xq = torch.empty(d // 4, device=x.device, dtype=torch.int32)
    st = torch.empty(3, d // 32, device=x.device, dtype=torch.float32)
    on = pdl() and pdl_launch is not False
    _rms_norm_q8_kernel[(1,)](x, weight, y, xq, st, d, eps, BLOCK=max(32, triton.next_power_of_2(d)), PDL=on,
                              num_warps=4 if d <= 4096 else 8, **({"launch_pdl": True} if on else {}))
    return y, xq, st


def quantize_q8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(int8 codes (D,) in column order, d (D/32,), sum(x) (D/32,)) of one row with plain torch ops (the norm kernel's
    twin: d = max|x| / 127 per 32 columns, codes rounded half up)."""
    v = x.float().reshape(-1, 32)
    amax = v.abs().amax(1)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.floor(v * inv[:, None] + 0.5)
    return q.reshape(-1).to(torch.int8), amax / 127.0, v.sum(1)


# q8 launch parameters per (weight rows, K, gated), from `python3 benchmarks/gpu_int4_decode.py --q8` on an H200 (norm
# then GEMV, 28 layers in one graph): 7B qkv 6.90 us against 7.85 for the norm and the bf16 GEMV, gate_up 20.19 against
# 28.71 (3.57 TB/s against 2.51).
Q8_TUNED: dict[tuple[int, int, bool], dict] = {
    (4608, 3584, False): dict(BN=16, BB=8, num_warps=1, KS=7),  # 7B qkv (+ bias)
    (37888, 3584, True): dict(BN=8, BB=8, num_warps=1, KS=1),  # 7B gate_up, gated
}


def gemv_q8_config(n: int, k: int, *, gated: bool = False) -> dict:
    tuned = Q8_TUNED.get((n, k, gated))
    if tuned is not None and (k // 32) % tuned["BB"] == 0:
        return dict(tuned)
    if gated:
        return dict(BN=8, BB=_largest_block_step(k // 32, 16), num_warps=2, KS=1)
    if n <= 8192:
        bb = _largest_block_step(k // 32, 8)
        return dict(BN=16, BB=bb, num_warps=1, KS=max(1, min(7, (k // 32) // bb)))
    return dict(BN=32, BB=_largest_block_step(k // 32, 8), num_warps=2, KS=1)


def gemv_q8(xq: torch.Tensor, st: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor, group_size: int,
            bias: torch.Tensor | None = None, *, gated: bool = False, **config) -> torch.Tensor:
    """y (1, N) bf16 = x @ w^T (+ bias float32) for one row x given as rms_norm_q8's int8 words and stats; gated:
    w = [gate; up] (2N rows), y = silu(gate) * up. `config` overrides gemv_q8_config."""
    nw, k = packed.shape[0], packed.shape[1] * 2
    n = nw // 2 if gated else nw
    assert xq.numel() == k // 4 and st.numel() == 3 * (k // 32), (xq.shape, st.shape, k)
    y = torch.empty(1, n, device=packed.device, dtype=torch.bfloat16)
    cfg = gemv_q8_config(nw, k, gated=gated) | config
    ks = cfg.get("KS", 1)
    assert (k // 32) % cfg["BB"] == 0 and 1 <= ks <= (k // 32) // cfg["BB"], (k, cfg)
    meta = {kk: v for kk, v in cfg.items() if kk in ("num_warps", "num_stages", "maxnreg") and v}
    tiles = triton.cdiv(n, cfg["BN"])
    sem = ks > 1 and tiles <= _COUNTERS and packed.is_cuda  # (the interpreter on CPU tensors: the second launch)
    ws = y if ks == 1 else torch.empty(ks, 1, nw, device=packed.device, dtype=torch.float32)
    cnt = _counters(packed.device) if sem else ws
    on = pdl() and cfg.get("PDL", True)
    _gemv_q8_kernel[(tiles, ks)](
        xq, st, packed.view(torch.int32), sz.view(torch.int32), bias if bias is not None else y, y, ws, cnt, n, nw, k,
        k // 8, ks, GROUP=group_size, BN=cfg["BN"], BB=cfg["BB"], HAS_BIAS=bias is not None, SPLIT=ks > 1,
        GATED=gated, SEM=sem, KSP=triton.next_power_of_2(ks), PDL=on, **meta, **({"launch_pdl": True} if on else {}))
    if ks > 1 and not sem:
        _split_sum_kernel[(triton.cdiv(n, 1024),)](ws, bias if bias is not None else ws, ws, y, n, n, 0, ks,
                                                  HAS_BIAS=bias is not None, HAS_RES=False, GATED=gated, BLOCK=1024,
                                                  num_warps=4)
    return y


if triton is not None:

    @torch.library.custom_op("modelcore::rms_norm_q8", mutates_args=())
    def rms_norm_q8_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                    torch.Tensor]:
        """rms_norm_q8 (above) as one opaque op."""
        return rms_norm_q8(_unit_stride(x), weight, eps)

    @rms_norm_q8_op.register_fake
    def _(x, weight, eps):
        d = x.shape[-1]
        return (x.new_empty(x.shape), x.new_empty(d // 4, dtype=torch.int32),
                x.new_empty(3, d // 32, dtype=torch.float32))

    @torch.library.custom_op("modelcore::int4_linear_q8", mutates_args=())
    def int4_linear_q8_op(xq: torch.Tensor, st: torch.Tensor, packed: torch.Tensor, sz: torch.Tensor,
                          bias: torch.Tensor | None, group_size: int, gated: bool) -> torch.Tensor:
        """gemv_q8 (above) as one opaque op: (1, N) bf16, or (1, N/2) silu(gate) * up when gated."""
        return gemv_q8(xq, st, packed, sz, group_size, bias, gated=gated)

    @int4_linear_q8_op.register_fake
    def _(xq, st, packed, sz, bias, group_size, gated):
        return xq.new_empty(1, packed.shape[0] // 2 if gated else packed.shape[0], dtype=torch.bfloat16)
