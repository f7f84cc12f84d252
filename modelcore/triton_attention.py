"""CUDA attention-side kernels in Triton: one decode-step attention op (RoPE + cache write + GQA attention) and the
RoPE of a long fused q/k/v output.

Decode (`modelcore::decode_attention`): one token per row. From the fused qkv projection's output (B, (H + 2 Hkv) D)
one program per (row, kv head, key range) rotates the row's q heads of that group and its new key (float32 maths,
rounded to the activation dtype as the reference rounds them), writes the new key and value into the cache at the
row's position, and attends over cache slots [0, position): the new key and value come from registers, so a program
never reads the slot it writes. Keys are in BLOCK_N tiles, scores and P @ V on the tensor cores (the group's q heads
padded to 16 rows), softmax online in float32 (exp2). Caches longer than SPLIT_FROM slots split the key range
over programs (SPLIT_LEN keys each): ranges past the position return at once, and the last program of a (row, kv
head) to finish adds the partial softmaxes in range order (the split-K counters of triton_int4), so one launch. The mask the eager path builds (key slot <= position) is implied by the position,
so this op replaces RoPE, the cache scatter, the mask and SDPA in the decode step. No sliding window. Launched as a
programmatic dependent (triton_int4.pdl()), a program loads the row's position and its first key/value tiles before
waiting for the qkv GEMV (EARLY): neither may be written by the kernel launched just before the op.

Prefill RoPE (`modelcore::rope_qk`): (B*T, (H + 2 Hkv) D) -> the rotated q and k heads (B*T, H + Hkv, D) in one pass
(the eager form multiplies, concatenates and adds over the q/k heads in six passes).
"""
from __future__ import annotations

import math

import torch

from modelcore import triton_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

if triton is not None:
    from modelcore.triton_int4 import _pdl_launch, _pdl_wait

SPLIT_LEN = 64  # keys per program (a program per (row, kv head, key range); the last one to finish combines)
SPLIT_FROM = 64  # caches up to this many slots: one program per (row, kv head) walks all keys
EARLY = True  # PDL launches: a program's first key/value tiles load before the wait (see _decode_attn_kernel)


def available() -> bool:
    return triton is not None and torch.cuda.is_available()


def decode_splits(max_len: int, split_len: int = SPLIT_LEN, split_from: int = SPLIT_FROM) -> int:
    """How many key ranges a decode step's attention is split into for a cache of `max_len` slots."""
    return 1 if max_len <= split_from else -(-max_len // split_len)


if triton is not None:

    @triton.jit
    def _rotate(base, d, partner, sign, cos, sin):
        """RoPE of one head vector at `base` (float32): x * cos + rotate_half(x) * sin."""
        x = tl.load(base + d).to(tl.float32)
        xp = tl.load(base + partner).to(tl.float32)
        return x * cos + sign * xp * sin

    @triton.jit
    def _attend_tile(qb, kt, vt, km, m_i, l_i, acc, qk_scale):
        """One tile of keys kt (D, BLOCK_N) and values vt (BLOCK_N, D), slots masked by km, into the online softmax
        (running max m_i, sum l_i, output acc; scores in log2 units)."""
        qk = tl.dot(qb, kt) * qk_scale  # (RP, BLOCK_N)
        qk = tl.where(km[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)

    @triton.jit
    def _decode_attn_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, k_ptr, v_ptr, out_ptr, pacc_ptr, pm_ptr, pl_ptr, cnt_ptr,
                            stride_qkv, stride_cs, stride_kb, stride_kh, stride_kl, stride_vb, stride_vh, stride_vl,
                            stride_out, qk_scale,
                            H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr, REP: tl.constexpr, RP: tl.constexpr,
                            CHUNK: tl.constexpr, NSPLIT: tl.constexpr, BLOCK_N: tl.constexpr, SEM: tl.constexpr,
                            PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """Program (b, g, s): q heads g*REP .. g*REP+REP-1 of row b over key range s (slots [s*CHUNK, +CHUNK)).
        SEM (NSPLIT > 1): ranges past the row's position return at once; the others store their partial softmax,
        count themselves in at cnt_ptr[b * HKV + g], and the last of them combines the partials (in range order) and
        resets the counter.
        EARLY: the row's position and the range's first key and value tiles (cache slots below the position) load
        before the PDL wait, so their latency overlaps the qkv GEMV's tail. So neither the positions nor the cache may
        be written by the kernel launched just before this op (a decode step writes its positions at its start and
        the cache only through this op, a step or more earlier)."""
        b = tl.program_id(0).to(tl.int64)
        g = tl.program_id(1)
        s = tl.program_id(2)
        d = tl.arange(0, D)
        n = tl.arange(0, BLOCK_N)
        kbase = k_ptr + b * stride_kb + g * stride_kh
        vbase = v_ptr + b * stride_vb + g * stride_vh
        start = s * CHUNK
        if EARLY:  # no output of the previous kernel: the position, cached keys and values (ranges past it: none)
            pos = tl.load(pos_ptr + b).to(tl.int32)
            end = tl.minimum(start + CHUNK, pos)  # keys read from the cache: [start, end), all before the new token
            km0 = (start + n) < end
            kt0 = tl.load(kbase + (start + n).to(tl.int64)[None, :] * stride_kl + d[:, None], mask=km0[None, :],
                          other=0.0)
            vt0 = tl.load(vbase + (start + n).to(tl.int64)[:, None] * stride_vl + d[None, :], mask=km0[:, None],
                          other=0.0)
        if PDL:  # launched as a programmatic dependent (triton_int4.pdl()): wait for the qkv GEMV, let o_proj start
            _pdl_wait()
            _pdl_launch()
        if not EARLY:
            pos = tl.load(pos_ptr + b).to(tl.int32)
            end = tl.minimum(start + CHUNK, pos)
        if SEM:
            if s > pos // CHUNK:
                return
        partner = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        cos = tl.load(cos_ptr + b * stride_cs + d).to(tl.float32)
        sin = tl.load(sin_ptr + b * stride_cs + d).to(tl.float32)
        row = qkv_ptr + b * stride_qkv
        # the new key and value: rotated, rounded like the cache stores them
        kn = _rotate(row + (H + g) * D, d, partner, sign, cos, sin).to(k_ptr.dtype.element_ty)
        vn = tl.load(row + (H + HKV + g) * D + d)
        owner = s == pos // CHUNK  # the program whose key range holds the new token writes it and attends to it
        tl.store(kbase + pos.to(tl.int64) * stride_kl + d, kn, mask=(d < D) & owner)
        tl.store(vbase + pos.to(tl.int64) * stride_vl + d, vn.to(v_ptr.dtype.element_ty), mask=(d < D) & owner)
        # the group's q heads (RP >= 16 rows for the tensor cores; rows past REP are zeros and never stored)
        r = tl.arange(0, RP)
        rmask = r < REP
        qp = row + (g * REP + r)[:, None] * D
        q = tl.load(qp + d[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        qx = tl.load(qp + partner[None, :], mask=rmask[:, None], other=0.0).to(tl.float32)
        qb = (q * cos[None, :] + sign[None, :] * qx * sin[None, :]).to(k_ptr.dtype.element_ty)  # (RP, D)
        m_i = tl.full((RP,), float("-inf"), tl.float32)
        l_i = tl.zeros((RP,), tl.float32)
        acc = tl.zeros((RP, D), tl.float32)
        first = start
        if EARLY:
            if start < end:  # the first tile, loaded before the wait (masked slots: zeros)
                m_i, l_i, acc = _attend_tile(qb, kt0, vt0, km0, m_i, l_i, acc, qk_scale)
            first = start + BLOCK_N
        for j in range(first, end, BLOCK_N):
            kidx = j + n
            km = kidx < end
            kt = tl.load(kbase + kidx.to(tl.int64)[None, :] * stride_kl + d[:, None], mask=km[None, :], other=0.0)
            vt = tl.load(vbase + kidx.to(tl.int64)[:, None] * stride_vl + d[None, :], mask=km[:, None], other=0.0)
            m_i, l_i, acc = _attend_tile(qb, kt, vt, km, m_i, l_i, acc, qk_scale)
        # the new token (owner only): its score from the rounded q and k, like a cache read would give
        sn = tl.sum(qb.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
        sn = tl.where(owner, sn, float("-inf"))
        m_new = tl.maximum(m_i, sn)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a split with no keys at all stays empty, not NaN
        alpha = tl.exp2(m_i - m_safe)
        pn = tl.exp2(sn - m_safe)
        pn_r = pn.to(vn.dtype).to(tl.float32)  # P is rounded to the value dtype before P @ V, as in the tiles above
        l_i = l_i * alpha + pn
        acc = acc * alpha[:, None] + pn_r[:, None] * vn.to(tl.float32)[None, :]
        m_i = m_new
        hidx = g * REP + r
        if NSPLIT == 1:
            o = acc / l_i[:, None]
            tl.store(out_ptr + b * stride_out + hidx[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty),
                     mask=rmask[:, None])
        else:  # partials (B, H, NSPLIT, D), (B, H, NSPLIT): added by the last program (SEM) or _decode_attn_combine
            part = (b * H + hidx) * NSPLIT + s
            tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=rmask[:, None])
            tl.store(pm_ptr + part, m_i, mask=rmask)
            tl.store(pl_ptr + part, l_i, mask=rmask)
            if SEM:
                tl.debug_barrier()  # every thread's partials stored before the release below
                active = pos // CHUNK + 1
                arrived = tl.atomic_add(cnt_ptr + b * HKV + g, 1, sem="acq_rel")
                if arrived == active - 1:
                    base = (b * H + hidx) * NSPLIT
                    mx = tl.full((RP,), float("-inf"), tl.float32)
                    lt = tl.zeros((RP,), tl.float32)
                    ot = tl.zeros((RP, D), tl.float32)
                    for t in range(0, active):  # range 0 is never empty, so mx is finite from the first
                        ms = tl.load(pm_ptr + base + t, mask=rmask, other=0.0, cache_modifier=".cg")
                        ls = tl.load(pl_ptr + base + t, mask=rmask, other=0.0, cache_modifier=".cg")
                        accs = tl.load(pacc_ptr + (base + t)[:, None] * D + d[None, :], mask=rmask[:, None],
                                       other=0.0, cache_modifier=".cg")
                        mn = tl.maximum(mx, ms)
                        wa = tl.exp2(mx - mn)
                        wb = tl.exp2(ms - mn)
                        ot = ot * wa[:, None] + accs * wb[:, None]
                        lt = lt * wa + ls * wb
                        mx = mn
                    o = ot / lt[:, None]
                    tl.store(out_ptr + b * stride_out + hidx[:, None] * D + d[None, :],
                             o.to(out_ptr.dtype.element_ty), mask=rmask[:, None])
                    tl.atomic_xchg(cnt_ptr + b * HKV + g, 0)  # ready for the next launch

    @triton.jit
    def _decode_attn_combine(pacc_ptr, pm_ptr, pl_ptr, out_ptr, stride_out, H: tl.constexpr, D: tl.constexpr,
                             NSPLIT: tl.constexpr, NSP: tl.constexpr):
        """out[b, h] = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s (key range 0 is never empty, so M is finite)."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        sidx = tl.arange(0, NSP)
        smask = sidx < NSPLIT
        part = (b * H + h) * NSPLIT + sidx
        m = tl.load(pm_ptr + part, mask=smask, other=float("-inf"))
        l = tl.load(pl_ptr + part, mask=smask, other=0.0)
        mx = tl.max(m, 0)
        w = tl.exp2(m - mx)
        d = tl.arange(0, D)
        acc = tl.load(pacc_ptr + part[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
        o = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
        tl.store(out_ptr + b * stride_out + h * D + d, o.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _rope_qk_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, stride_x, stride_cs, HQK: tl.constexpr, HP: tl.constexpr,
                        D: tl.constexpr):
        """Row t: the first HQK heads of x[t] (float32 maths, one rounding) -> out[t] (HQK, D)."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HP)
        hm = (h < HQK)[:, None]
        d = tl.arange(0, D // 2)
        xp = x_ptr + t * stride_x + h[:, None] * D + d[None, :]
        x1 = tl.load(xp, mask=hm, other=0.0).to(tl.float32)
        x2 = tl.load(xp + D // 2, mask=hm, other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + t * stride_cs + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + t * stride_cs + D // 2 + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + t * stride_cs + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + t * stride_cs + D // 2 + d).to(tl.float32)[None, :]
        op = out_ptr + t * (HQK * D) + h[:, None] * D + d[None, :]
        tl.store(op, (x1 * c1 - x2 * s1).to(out_ptr.dtype.element_ty), mask=hm)
        tl.store(op + D // 2, (x2 * c2 + x1 * s2).to(out_ptr.dtype.element_ty), mask=hm)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int, scale: float,
                     *, nsplit: int | None = None, block_n: int = 64, num_warps: int = 4, sem: bool = True,
                     split_len: int | None = None) -> torch.Tensor:
    """Attention output (B, H*D) of one new token per row; writes its rotated key and value at `positions` (B,).

    qkv (B, (H + 2 Hkv) D) unrotated; cos, sin (B, D); k_cache, v_cache (>= B, Hkv, L, D) with unit last stride."""
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    assert qkv.shape[1] == (n_heads + 2 * n_kv_heads) * d and qkv.stride(1) == 1, (qkv.shape, n_heads, n_kv_heads, d)
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert cos.stride(0) == sin.stride(0) and d & (d - 1) == 0
    rep = n_heads // n_kv_heads
    rp = max(16, triton.next_power_of_2(rep))
    max_len = k_cache.shape[2]
    if split_len is not None:
        block_n = min(block_n, split_len)
    ns = decode_splits(max_len, split_len or SPLIT_LEN, split_len or SPLIT_FROM) if nsplit is None else nsplit
    chunk = max(block_n, -(-max_len // ns)) if ns > 1 else max(max_len, 1)
    chunk = -(-chunk // block_n) * block_n
    ns = -(-max_len // chunk) if ns > 1 else 1
    out = torch.empty(b, n_heads * d, device=qkv.device, dtype=qkv.dtype)
    if ns > 1:
        pacc = torch.empty(b, n_heads, ns, d, device=qkv.device, dtype=torch.float32)
        pm = torch.empty(b, n_heads, ns, device=qkv.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = out
    pos = positions.reshape(b)
    sem = sem and ns > 1 and b * n_kv_heads <= triton_int4._COUNTERS
    cnt = triton_int4._counters(qkv.device) if sem else out
    on = triton_int4.pdl() and (sem or ns == 1)  # the two-launch form keeps plain launches
    _decode_attn_kernel[(b, n_kv_heads, ns)](
        qkv, cos, sin, pos, k_cache, v_cache, out, pacc, pm, pl, cnt, qkv.stride(0), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), scale * math.log2(math.e), H=n_heads, HKV=n_kv_heads, D=d, REP=rep, RP=rp, CHUNK=chunk,
        NSPLIT=ns, BLOCK_N=block_n, SEM=sem, PDL=on, EARLY=EARLY and on, num_warps=num_warps,
        **({"launch_pdl": True} if on else {}))
    if ns > 1 and not sem:
        _decode_attn_combine[(b, n_heads)](pacc, pm, pl, out, out.stride(0), H=n_heads, D=d, NSPLIT=ns,
                                           NSP=triton.next_power_of_2(ns), num_warps=4)
    return out


def decode_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
                               scale: float) -> torch.Tensor:
    """The naive twin of decode_attention with plain torch ops (float32 maths; same roundings of q, k, P)."""
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    x = qkv.float().view(b, n_heads + 2 * n_kv_heads, d)
    c, s = cos.float()[:, None], sin.float()[:, None]
    rot = lambda t: t * c + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * s  # noqa: E731
    q = rot(x[:, :n_heads]).to(k_cache.dtype).float()  # (B, H, D)
    k = rot(x[:, n_heads:n_heads + n_kv_heads]).to(k_cache.dtype)
    v = x[:, n_heads + n_kv_heads:].to(v_cache.dtype)
    out = torch.empty(b, n_heads, d, device=qkv.device, dtype=torch.float32)
    rep = n_heads // n_kv_heads
    for i in range(b):
        p = int(positions.reshape(-1)[i])
        k_cache[i, :, p] = k[i]
        v_cache[i, :, p] = v[i]
        keys = k_cache[i, :, :p + 1].float().repeat_interleave(rep, 0)  # (H, p+1, D)
        vals = v_cache[i, :, :p + 1].float().repeat_interleave(rep, 0)
        att = ((q[i][:, None] * keys).sum(-1) * scale).softmax(-1)  # (H, p+1)
        out[i] = (att.to(v_cache.dtype).float()[..., None] * vals).sum(1)
    return out.view(b, n_heads * d).to(qkv.dtype)


def rope_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_qk_heads: int, head_dim: int) -> torch.Tensor:
    """Rotated first `n_qk_heads` heads (N, n_qk_heads, D) of qkv (N, >= n_qk_heads * D) rows; cos, sin (N, D)."""
    n = qkv.shape[0]
    out = torch.empty(n, n_qk_heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    assert qkv.stride(1) == 1 and cos.stride(1) == 1 and sin.stride(1) == 1 and cos.stride(0) == sin.stride(0)
    if n:
        _rope_qk_kernel[(n,)](qkv, cos, sin, out, qkv.stride(0), cos.stride(0), HQK=n_qk_heads,
                              HP=triton.next_power_of_2(n_qk_heads), D=head_dim, num_warps=4)
    return out


if triton is not None:

    @torch.library.custom_op("modelcore::decode_attention", mutates_args=("k_cache", "v_cache"))
    def decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                            k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int, n_kv_heads: int,
                            scale: float) -> torch.Tensor:
        """One decode step's attention (see decode_attention); the cache writes are the op's side effect."""
        return decode_attention(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv_heads, scale)

    @decode_attention_op.register_fake
    def _(qkv, cos, sin, positions, k_cache, v_cache, n_heads, n_kv_heads, scale):
        return qkv.new_empty(qkv.shape[0], n_heads * k_cache.shape[-1])

    @torch.library.custom_op("modelcore::rope_qk", mutates_args=())
    def rope_qk_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_qk_heads: int,
                   head_dim: int) -> torch.Tensor:
        """rope_qk as one opaque op."""
        return rope_qk(qkv, cos, sin, n_qk_heads, head_dim)

    @rope_qk_op.register_fake
    def _(qkv, cos, sin, n_qk_heads, head_dim):
        return qkv.new_empty(qkv.shape[0], n_qk_heads, head_dim)
