"""Triton kernels for small-batch MoE decode (CUDA only; imported lazily by modelcore.moe).

With a handful of tokens each routed expert sees one or two rows, so a grouped GEMM wastes most of its tile
and the launch of its setup kernels. These kernels do one GEMV per (token, expert) pair straight out of the
packed expert stacks, reading each chosen expert's weights once, with no sorting or offsets:

    moe_gate_up:  h[p] = silu(W1[e_p] x_p) * (W3[e_p] x_p)          (pairs p = token * k + slot)
    moe_down:     y[p] = route_weight_p * (W2[e_p] h[p])             (summed over the k slots afterwards)

The twin they are checked against is MoE._dispatch_sorted (benchmarks/gpu_moe.py prints the difference).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gate_up_kernel(x_ptr, idx_ptr, w13_ptr, h_ptr, K_SLOTS: tl.constexpr, D: tl.constexpr, INTER: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    nb = tl.program_id(1)
    token = pair // K_SLOTS
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < INTER
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_base = w13_ptr + expert * (2 * INTER * D)
    for k0 in range(0, D, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < D
        x = tl.load(x_ptr + token * D + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_K,)
        m = row_ok[:, None] & col_ok[None, :]
        wg = tl.load(w_base + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        wu = tl.load(w_base + (rows[:, None] + INTER) * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        acc_g += tl.sum(wg * x[None, :], axis=1)
        acc_u += tl.sum(wu * x[None, :], axis=1)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # silu(gate) * up
    tl.store(h_ptr + pair * INTER + rows, h.to(h_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def _down_kernel(h_ptr, idx_ptr, rw_ptr, w2_ptr, y_ptr, D: tl.constexpr, INTER: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pair = tl.program_id(0)
    nb = tl.program_id(1)
    expert = tl.load(idx_ptr + pair).to(tl.int64)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < D
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    w_base = w2_ptr + expert * (D * INTER)
    for k0 in range(0, INTER, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_ok = cols < INTER
        h = tl.load(h_ptr + pair * INTER + cols, mask=col_ok, other=0.0).to(tl.float32)
        w = tl.load(w_base + rows[:, None] * INTER + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w * h[None, :], axis=1)
    rw = tl.load(rw_ptr + pair).to(tl.float32)
    tl.store(y_ptr + pair * D + rows, acc * rw, mask=row_ok)


def moe_gemv(x: torch.Tensor, idx: torch.Tensor, route_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, *,
             block_n: int = 8, block_k: int = 128, num_warps: int = 8) -> torch.Tensor:
    """Routed-expert output (N, D) for tokens x (N, D), expert ids idx (N, k), weights (N, k); stacks as in MoE.pack().

    Default blocks: fastest of benchmarks/gpu_moe.py's sweep on an H200 at DeepSeek-V2-Lite sizes (34 us per layer).
    """
    n, d = x.shape
    k = idx.shape[1]
    inter = w2.shape[-1]
    assert w13.shape[1:] == (2 * inter, d) and w13.is_contiguous() and w2.is_contiguous()
    x, idx_flat, rw = x.contiguous(), idx.reshape(-1).contiguous(), route_w.reshape(-1).float().contiguous()
    h = torch.empty(n * k, inter, device=x.device, dtype=x.dtype)
    _gate_up_kernel[(n * k, triton.cdiv(inter, block_n))](x, idx_flat, w13, h, K_SLOTS=k, D=d, INTER=inter,
                                                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps)
    y = torch.empty(n * k, d, device=x.device, dtype=torch.float32)
    _down_kernel[(n * k, triton.cdiv(d, block_n))](h, idx_flat, rw, w2, y, D=d, INTER=inter, BLOCK_N=block_n,
                                                   BLOCK_K=block_k, num_warps=num_warps)
    return y.view(n, k, d).sum(1).to(x.dtype)  # (N, D)
