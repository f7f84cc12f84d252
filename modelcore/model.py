"""Decoder-only Transformer for the Llama and Qwen2 families (DeepSeek layers plug in per layer via factories).

Module names follow Hugging Face checkpoint keys, so an HF state dict loads 1:1:
``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.input_layernorm``,
``.post_attention_layernorm``, ``.mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelcore import triton_attention, triton_int4, triton_mlp
from modelcore.args import ModelArgs
from modelcore.cache import KVCache
from modelcore.rope import RotaryEmbedding, apply_rotary

LayerCache = Any  # KVCache for GQA, modelcore.mla's cache for MLA: both follow modelcore/cache.py's API


@dataclass
class ModelOutput:
    """What Transformer.forward returns: logits (B, T, vocab) and, on request, final-norm hidden states (B, T, D)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None




def linear(mod: nn.Module, x: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """mod(x): the one place the model calls its linears. (A CUDA int4 linear picks its own path by the number of rows:
    the Triton GEMV for a few, dequantize + dense GEMM for more; see modelcore/triton_int4.py. Dequantizing the next
    layer's weight on a side stream during a long prefill was tried and measured slower on an H200: 88.9 vs 85.4 ms
    for a 4096-token prefill's 28 layers of int4 linears, the GEMMs not sharing the GPU with it.)
    xq: x's one row as int8 words and block stats, made for `mod` by _decode_norm (the q8 GEMV reads them instead)."""
    if xq is not None and _cuda_int4(mod):
        y = torch.ops.modelcore.int4_linear_q8(xq[0], xq[1], mod.packed, mod.scales_and_zeros, mod.bias,
                                               mod.group_size, False)
        return y.view(*x.shape[:-1], mod.out_features).to(x.dtype)
    return mod(x)


def _cuda_int4(mod: nn.Module) -> bool:
    """A CUDA int4 linear in our Triton layout (modelcore/triton_int4.py)."""
    packed = getattr(mod, "packed", None)
    return (isinstance(packed, torch.Tensor) and packed.is_cuda and packed.dtype == torch.uint8
            and getattr(mod, "kernel", None) == "packed")


def _cuda_fusable(x: torch.Tensor) -> bool:
    """GPU fused paths (Triton kernels) run on 16-bit CUDA activations; float32 keeps the reference ops."""
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)


def _bf16_rows(x: torch.Tensor) -> torch.Tensor:
    """x as (rows, features) bfloat16, what the CUDA int4 ops take."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.dtype == torch.bfloat16 else x.to(torch.bfloat16)


def linear_residual(mod: nn.Module, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + mod(x). On CUDA one kernel: the int4 GEMV adds the residual before its rounding, dequantize + GEMM
    and bf16 GEMMs take it as the accumulator input (addmm); under torch.compile the add is left to Inductor."""
    if _cuda_int4(mod):
        y = torch.ops.modelcore.int4_linear(_bf16_rows(x), mod.packed, mod.scales_and_zeros, mod.bias,
                                            mod.group_size, residual.reshape(-1, mod.out_features))
        return y.view(residual.shape).to(residual.dtype)
    if (isinstance(mod, nn.Linear) and mod.bias is None and x.dtype == mod.weight.dtype == residual.dtype
            and not torch.compiler.is_compiling()):
        y = torch.addmm(residual.reshape(-1, mod.out_features), x.reshape(-1, mod.in_features), mod.weight.t())
        return y.view(residual.shape)
    return residual + linear(mod, x)


def gate_up_silu(mod: nn.Module, x: torch.Tensor, xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """silu(gate(x)) * up(x) of a fused [gate; up] linear on CUDA: for CUDA int4 one op (one row: the GEMV with the
    activation in its epilogue), else the GEMM and one activation kernel (modelcore/triton_mlp.py); under
    torch.compile the activation is left to Inductor. xq: as for linear()."""
    if xq is not None and _cuda_int4(mod):
        h = torch.ops.modelcore.int4_linear_q8(xq[0], xq[1], mod.packed, mod.scales_and_zeros, mod.bias,
                                               mod.group_size, True)
        return h.view(*x.shape[:-1], mod.out_features // 2).to(x.dtype)
    if _cuda_int4(mod):
        h = torch.ops.modelcore.int4_gate_up_silu(_bf16_rows(x), mod.packed, mod.scales_and_zeros,
                                                  mod.bias, mod.group_size)
        return h.view(*x.shape[:-1], mod.out_features // 2).to(x.dtype)
    gu = linear(mod, x)
    if torch.compiler.is_compiling():
        gate, up = gu.chunk(2, dim=-1)
        return F.silu(gate) * up
    return torch.ops.modelcore.silu_mul(gu.reshape(-1, gu.shape[-1])).view(*gu.shape[:-1], gu.shape[-1] // 2)


def dequantize_cuda_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """bf16 weight (N, K) of a CUDA int4 weight in our layout (one Triton kernel; twin: triton_int4.dequantize_reference)."""
    from modelcore import triton_int4

    return triton_int4.dequantize(packed, scales_and_zeros, group_size)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused kernel reading x once (float32 statistics; the weight applied before rounding)
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), eps=self.eps)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def _decode_norm(norm: RMSNorm, x: torch.Tensor,
                 nxt: nn.Module | None) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(norm(x), xq). On CUDA, for a few 16-bit rows (decode) that feed a CUDA int4 linear: triton_int4's norm kernel,
    one opaque op launched as a programmatic dependent, so the GEMV after it starts and streams its weights while the
    norm runs (the same maths as F.rms_norm: float32 statistics, the weight applied before one rounding). For one row
    (triton_int4.Q8) the kernel also quantizes the normed row to int8 per 32 columns: xq = (words, block stats), which
    linear() / gate_up_silu() hand to the q8 GEMV of `nxt`; else xq is None."""
    rows = x.numel() // x.shape[-1]
    if nxt is not None and _cuda_int4(nxt) and _cuda_fusable(x) and rows <= triton_int4.GEMV_MAX_ROWS:
        w = norm.weight.to(x.dtype)
        if (rows == 1 and triton_int4.Q8 and x.dtype == torch.bfloat16
                and triton_int4.q8_supported(x.shape[-1], nxt.group_size)):
            h, xq, st = torch.ops.modelcore.rms_norm_q8(x.reshape(1, x.shape[-1]), w, norm.eps)
            return h.view(x.shape), (xq, st)
        return torch.ops.modelcore.rms_norm_rows(x.reshape(rows, x.shape[-1]), w, norm.eps).view(x.shape), None
    return norm(x), None


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Reference attention (B,H,T,D)x(B,H,S,D) -> (B,H,T,Dv): explicit softmax in float32, the twin of SDPA."""
    scores = (q @ k.transpose(-1, -2)).float() * scale  # (B, H, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(-1).to(q.dtype)
    return probs @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              naive: bool = False) -> torch.Tensor:
    """Scaled dot-product attention with a boolean mask (True = may attend); k/v may have fewer heads than q (GQA)."""
    n_rep = q.shape[1] // k.shape[1]
    if naive:
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, D)
            v = v.repeat_interleave(n_rep, dim=1)
        return naive_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=n_rep > 1)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query per row (T == 1): (B,H,1,D)x(B,Hkv,S,D) -> (B,H,1,D) as two batched matmuls, softmax in float32.

    On CPU this is several times cheaper than SDPA's flash kernel for a single query (no tiling set-up); the GQA
    query heads of one key/value head are stacked as rows of one matmul, so K/V are never repeated.
    """
    b, h, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, h // hkv, d)  # (B, Hkv, rep, D)
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # (B, Hkv, rep, S)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))  # mask (B, 1, 1, S)
    probs = scores.softmax(-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, h, 1, v.shape[-1])  # (B, H, 1, Dv)


class Attention(nn.Module):
    """Multi-head attention with grouped key/value heads (MHA, GQA, MQA) and RoPE."""

    def __init__(self, args: ModelArgs, layer_id: int = 0):
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.n_rep = args.n_rep
        self.scale = self.head_dim ** -0.5
        self.naive = False  # tests flip this to compare against the reference attention
        self.q_proj = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=args.o_bias)
        self.rotary = RotaryEmbedding(self.head_dim, args.rope_theta, args.max_position_embeddings, args.rope_scaling)
        self.window = args.sliding_window
        self.fused_cuda = True  # CUDA: Triton decode attention and RoPE (modelcore/triton_attention.py) where they apply

    def new_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """Allocate this layer's KV cache: float32 for 16-bit models on a CPU, at twice the cache memory, because CPU
        attention over a 16-bit cache is slow even with bf16 dot-product units (SDPA, one query over 256 keys, 2
        threads, AVX512-BF16: 116 us in bf16 against 22 us in float32; decode ~20% faster end to end)."""
        if torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16):
            dtype = torch.float32
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def fuse(self) -> bool:
        """Replace q/k/v_proj by one `qkv_proj` (outputs side by side; quantized codes kept as they are). False if not possible."""
        if hasattr(self, "qkv_proj"):
            return True
        from modelcore.quant import cat_linears

        try:
            self.qkv_proj = cat_linears([self.q_proj, self.k_proj, self.v_proj])
        except ValueError:  # e.g. CUDA int4 layout: fuse the float model before quantizing instead
            return False
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B,H,T,D), k, v (B,Hkv,T,D) before RoPE."""
        b, t, _ = x.shape
        if hasattr(self, "qkv_proj"):
            qkv = linear(self.qkv_proj, x).view(b, t, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
            return qkv.split([self.n_heads, self.n_kv_heads, self.n_kv_heads], dim=1)  # (B, H|Hkv|Hkv, T, D)
        q = linear(self.q_proj, x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = linear(self.k_proj, x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = linear(self.v_proj, x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        return q, k, v

    def _fused_decode(self, x: torch.Tensor, cache: LayerCache | None, rope) -> bool:
        """One Triton op for RoPE, the cache write and the attention of a decode step (see triton_attention)."""
        return (self.fused_cuda and rope is not None and x.shape[1] == 1 and _cuda_fusable(x)
                and isinstance(cache, KVCache) and cache.k.dtype == x.dtype and cache.v.dtype == x.dtype
                and hasattr(self, "qkv_proj") and not self.naive and self.window is None
                and self.head_dim & (self.head_dim - 1) == 0 and self.head_dim <= 256 and triton_attention.available())

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                causal: bool = False, residual: torch.Tensor | None = None,
                xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (B,T,D), positions (B,T), mask (B,1,T,S) (True = may attend); rope: (cos, sin) for `positions` if precomputed.

        causal=True: every row holds positions 0..T-1 (unpadded prompt from the start): mask is ignored and SDPA runs
        its causal kernel (flash attention on CUDA) over the new keys only.
        residual (B,T,dim): returned plus the output (CUDA: added by the output projection's kernel).
        xq: x (one row) quantized for qkv_proj by _decode_norm (used by the fused decode path only).
        On CUDA with 16-bit activations a decode step (T == 1, GQA cache, fused qkv) runs RoPE, the cache write and
        the attention as one Triton op, which reads the causal mask off the positions (slots <= position).
        """
        b, t, _ = x.shape
        cos, sin = rope if rope is not None else self.rotary(positions, x.dtype)
        if self._fused_decode(x, cache, rope):
            qkv = linear(self.qkv_proj, x, xq).view(b, -1)  # (B, (H + 2 Hkv) D)
            out = torch.ops.modelcore.decode_attention(qkv, cos.reshape(b, -1), sin.reshape(b, -1), positions.reshape(b),
                                                       cache.k, cache.v, self.n_heads, self.n_kv_heads, self.scale)
            return self._out(out.view(b, 1, -1), residual)
        if hasattr(self, "qkv_proj"):  # q and k heads are adjacent in the fused output: rotate them in one go
            y = linear(self.qkv_proj, x)  # (B, T, (H + 2 Hkv) D)
            qkv = y.view(b, t, self.n_heads + 2 * self.n_kv_heads, self.head_dim).transpose(1, 2)
            hqk = self.n_heads + self.n_kv_heads
            if self.fused_cuda and _cuda_fusable(x) and t > 1 and triton_attention.available():  # one pass, float32 maths
                qk = torch.ops.modelcore.rope_qk(y.view(b * t, -1), cos.reshape(b * t, -1), sin.reshape(b * t, -1), hqk,
                                                 self.head_dim).view(b, t, hqk, self.head_dim).transpose(1, 2)
                q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)  # (B, H|Hkv, T, D)
            else:
                q, k = apply_rotary(qkv[:, :hqk], cos, sin).split([self.n_heads, self.n_kv_heads], dim=1)
            v = qkv[:, hqk:]  # (B, Hkv, T, D)
        else:
            q, k, v = self._qkv(x)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if causal and not self.naive:
            if cache is not None:
                cache.write_prefix(k, v)  # positions are 0..T-1 in every row
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=self.n_rep > 1)
            return self._out(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), residual)
        if cache is not None:
            k_all, v_all = cache.update(positions, k, v)
            s = mask.shape[-1] if mask is not None else cache.max_len
            k, v = k_all[:b, :, :s], v_all[:b, :, :s]  # (B, Hkv, S, D)
        if t == 1 and not self.naive and x.device.type == "cpu":
            qc = q.to(k.dtype)  # the cache may be float32 while activations are bf16 (see new_cache)
            if b == 1:
                out = F.scaled_dot_product_attention(qc, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.n_rep > 1)
            else:
                out = decode_attention(qc, k, v, mask, self.scale)  # (B, H, 1, D)
            out = out.to(q.dtype)
        else:  # the cache may be float32 while activations are bf16 (see new_cache)
            out = attention(q.to(k.dtype), k, v, mask, self.scale, naive=self.naive).to(q.dtype)  # (B, H, T, D)
        return self._out(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), residual)

    def _out(self, out: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        """o_proj(out) (B, T, dim), plus residual when given."""
        if residual is None:
            return linear(self.o_proj, out)
        return linear_residual(self.o_proj, out, residual)

    def unfused_linears(self) -> dict[str, nn.Module]:
        """Float q/k/v_proj split out of a fused qkv_proj (for saving in the checkpoint's layout)."""
        sizes = [self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2
        return dict(zip(("q_proj", "k_proj", "v_proj"), split_linear(self.qkv_proj, sizes)))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.up_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.down_proj = nn.Linear(inter_dim, dim, bias=bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]
        self.fused_cuda = True  # CUDA: silu * up in one kernel (the int4 GEMV's epilogue for one row), residual fused

    def fuse(self) -> bool:
        """Replace gate/up_proj by one `gate_up_proj`. False if the modules cannot be concatenated."""
        if hasattr(self, "gate_up_proj"):
            return True
        from modelcore.quant import cat_linears

        try:
            self.gate_up_proj = cat_linears([self.gate_proj, self.up_proj])
        except ValueError:
            return False
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                xq: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """x (..., dim) -> (..., dim); residual: returned plus the output (CUDA: added by down_proj's kernel); xq: x
        (one row) quantized for gate_up_proj by _decode_norm."""
        if hasattr(self, "gate_up_proj"):
            if (self.fused_cuda and self.act is F.silu and _cuda_fusable(x)
                    and (triton_mlp.available() or torch.compiler.is_compiling())):
                h = gate_up_silu(self.gate_up_proj, x, xq)  # (..., I)
            else:
                gate, up = linear(self.gate_up_proj, x).chunk(2, dim=-1)  # (..., I) each
                h = self.act(gate) * up
        else:
            h = self.act(linear(self.gate_proj, x)) * linear(self.up_proj, x)
        if residual is None:
            return linear(self.down_proj, h)
        return linear_residual(self.down_proj, h, residual)

    def unfused_linears(self) -> dict[str, nn.Module]:
        """Float gate/up_proj split out of a fused gate_up_proj."""
        half = self.down_proj.in_features
        return dict(zip(("gate_proj", "up_proj"), split_linear(self.gate_up_proj, [half, half])))


def split_linear(fused: nn.Module, sizes: list[int]) -> list[nn.Linear]:
    """Float nn.Linears computing row blocks `sizes` of `fused` (nn.Linear or a quantized twin with dequantize())."""
    if isinstance(fused, nn.Linear):
        w, bias = fused.weight, fused.bias
    else:
        w, bias = fused.dequantize(), getattr(fused, "bias", None)
    out = []
    for wi, bi in zip(w.split(sizes), bias.split(sizes) if bias is not None else [None] * len(sizes)):
        lin = nn.Linear(wi.shape[1], wi.shape[0], bias=bi is not None, device="meta")
        lin.weight = nn.Parameter(wi.detach(), requires_grad=False)
        if bi is not None:
            lin.bias = nn.Parameter(bi.detach().to(wi.dtype), requires_grad=False)
        out.append(lin)
    return out


def make_attention(args: ModelArgs, layer_id: int) -> nn.Module:
    """The attention module of layer `layer_id`: DeepSeek MLA when args.attention == 'mla', else GQA."""
    if args.attention == "mla":
        from modelcore.mla import MLA  # lazy: MLA lives in its own module

        return MLA(args, layer_id)
    return Attention(args, layer_id)


def make_ffn(args: ModelArgs, layer_id: int) -> nn.Module:
    """The feed-forward of layer `layer_id`: DeepSeekMoE on MoE layers, else a dense SwiGLU MLP."""
    if args.is_moe_layer(layer_id):
        from modelcore.moe import MoE  # lazy: MoE lives in its own module

        return MoE(args, layer_id)
    return MLP(args.dim, args.inter_dim, bias=args.mlp_bias, act=args.hidden_act)


class Block(nn.Module):
    """Pre-norm decoder block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.self_attn = make_attention(args, layer_id)
        self.mlp = make_ffn(args, layer_id)
        self.input_layernorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.rms_norm_eps)
        self.fused_cuda = True  # CUDA, 16-bit: residual adds inside the output projections' kernels

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None, mask: torch.Tensor | None,
                rope: tuple[torch.Tensor, torch.Tensor] | None = None, causal: bool = False) -> torch.Tensor:
        """rope: (cos, sin) shared by every GQA layer of the model, computed once per forward (None: the layer's own);
        causal: see Attention.forward (GQA layers only; given together with rope)."""
        if rope is None:
            x = x + self.self_attn(self.input_layernorm(x), positions, cache, mask)
        elif self.fused_cuda and _cuda_fusable(x) and isinstance(self.self_attn, Attention) and isinstance(self.mlp, MLP):
            # CUDA: the residual adds happen inside the output projections' kernels (see linear_residual)
            h, xq = _decode_norm(self.input_layernorm, x, getattr(self.self_attn, "qkv_proj", None))
            x = self.self_attn(h, positions, cache, mask, rope=rope, causal=causal, residual=x, xq=xq)
            h, xq = _decode_norm(self.post_attention_layernorm, x, getattr(self.mlp, "gate_up_proj", None))
            return self.mlp(h, residual=x, xq=xq)
        else:
            x = x + self.self_attn(self.input_layernorm(x), positions, cache, mask, rope=rope, causal=causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(args, i) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)
        shared: dict[tuple, RotaryEmbedding] = {}  # identical RoPE everywhere: one module, one cos/sin table per device
        for layer in self.layers:
            r = getattr(layer.self_attn, "rotary", None)
            if isinstance(r, RotaryEmbedding):
                key = (r.dim, r.theta, r.max_pos, repr(sorted(r.cfg.items())))
                layer.self_attn.rotary = shared.setdefault(key, r)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Logical positions (B, T) from a 0/1 mask: real tokens count 0,1,2..; pads get positions after the row's real tokens.

    Works for left and right padding; pads then write only cache slots that decoding overwrites later.
    """
    m = attention_mask.long()
    real = m.cumsum(-1) - 1  # (B, T)
    pad = (1 - m).cumsum(-1) - 1 + m.sum(-1, keepdim=True)
    return torch.where(m.bool(), real, pad)


def build_mask(positions: torch.Tensor, key_positions: torch.Tensor, key_valid: torch.Tensor | None = None,
               window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, S): query t may see key s when key_pos <= query_pos (and key is valid, and within window)."""
    mask = key_positions[:, None, None, :] <= positions[:, None, :, None]  # (B, 1, T, S)
    if window is not None:
        mask = mask & (key_positions[:, None, None, :] > positions[:, None, :, None] - window)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :].bool()
    return mask


class Transformer(nn.Module):
    """Causal language model: Decoder + lm_head. Also carries generate/stream/save_pretrained helpers."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.tokenizer: Any = None  # set by AutoModel.from_pretrained when tokenizer files are present
        self.quantization: str | None = None

    def tie_weights(self) -> None:
        """Share lm_head with the input embeddings when the config says so."""
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        """Where the model lives (read from the final norm, which is never quantized)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (the final norm's)."""
        return self.model.norm.weight.dtype

    def new_cache(self, batch: int, max_len: int) -> list[LayerCache]:
        """One cache per layer for `batch` rows of up to `max_len` tokens."""
        return [layer.self_attn.new_cache(batch, max_len, self.device, self.dtype) for layer in self.model.layers]

    def fuse_projections(self) -> int:
        """Fuse q/k/v and gate/up into one matmul each, in every layer that allows it (fewer, larger kernels per token).

        Call after quantization on CPU (quantized codes are concatenated as they are) or before it on CUDA (the
        CUDA int4 layout cannot be concatenated; fusing the float weights first gives the same codes). Returns the
        number of modules fused. save_pretrained still writes the checkpoint's own q/k/v, gate/up layout.
        """
        n = 0
        for layer in self.model.layers:
            for mod in (layer.self_attn, layer.mlp):
                if isinstance(mod, (Attention, MLP)) and mod.fuse():
                    n += 1
        return n

    @contextlib.contextmanager
    def unfused(self):
        """Temporarily restore the separate q/k/v, gate/up modules (float, split from the fused ones)."""
        swapped = []
        for layer in self.model.layers:
            for mod, name in ((layer.self_attn, "qkv_proj"), (layer.mlp, "gate_up_proj")):
                fused = getattr(mod, name, None)
                if fused is not None and isinstance(mod, (Attention, MLP)):
                    parts = mod.unfused_linears()
                    del mod._modules[name]
                    for k, v in parts.items():
                        setattr(mod, k, v)
                    swapped.append((mod, name, fused, list(parts)))
        try:
            yield self
        finally:
            for mod, name, fused, parts in swapped:
                for k in parts:
                    delattr(mod, k)
                setattr(mod, name, fused)

    def set_naive_attention(self, naive: bool) -> None:
        """Switch every attention to the explicit-softmax reference (tests)."""
        for layer in self.model.layers:
            if hasattr(layer.self_attn, "naive"):
                layer.self_attn.naive = naive

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                       attention_mask: torch.Tensor | None = None, kv_len: int | None = None,
                       blocks: list | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D).

        positions: (B, T) logical positions; default from attention_mask, else 0..T-1.
        cache: from new_cache(); K/V are written at `positions`, queries see cache slots <= their position.
        attention_mask: (B, T) 0/1 for padded batches (any padding side).
        kv_len: how many cache slots attention reads (default: up to the largest position, which reads it back to
        the host); a fixed kv_len (e.g. the cache length) makes the step free of host reads (CUDA graphs).
        blocks: callables standing in for self.model.layers (e.g. their torch.compile'd forms), same signature.
        """
        b, t = input_ids.shape
        dev = input_ids.device
        # an unpadded prompt from position 0: causal SDPA kernel, no mask tensor (GQA models without a window)
        causal = (positions is None and attention_mask is None and t > 1 and self.args.attention == "gqa"
                  and self.args.sliding_window is None)
        if positions is None:
            if attention_mask is not None:
                positions = positions_from_mask(attention_mask.to(dev))
            else:
                positions = torch.arange(t, device=dev).expand(b, t)
        if causal:
            mask = None
            assert cache is None or t <= cache[0].max_len, f"{t} tokens beyond cache length {cache[0].max_len}"
        elif cache is None:
            valid = attention_mask.to(dev) if attention_mask is not None else None
            mask = build_mask(positions, positions, valid, self.args.sliding_window)
        else:
            s = kv_len if kv_len is not None else int(positions.max()) + 1
            assert s <= cache[0].max_len, f"position {s - 1} beyond cache length {cache[0].max_len}"
            mask = build_mask(positions, torch.arange(s, device=dev).expand(b, s), window=self.args.sliding_window)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        rope = self.model.layers[0].self_attn.rotary(positions, h.dtype) if self.args.attention == "gqa" else None
        for i, layer in enumerate(blocks if blocks is not None else self.model.layers):
            h = layer(h, positions, cache[i] if cache is not None else None, mask, rope, causal)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False, kv_len: int | None = None) -> ModelOutput:
        """Logits (B, T, vocab) — or (B, 1, vocab) for the last token only when last_only=True."""
        h = self.forward_hidden(input_ids, positions, cache, attention_mask, kv_len=kv_len)
        if last_only:
            h = h[:, -1:]
        return ModelOutput(logits=self.lm_head(h))

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D) for pooling (embeddings from a decoder)."""
        return self.forward_hidden(input_ids, attention_mask=attention_mask)

    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """Token ids (B, prompt+new) — see modelcore.generate.generate for the options."""
        from modelcore.generate import generate

        return generate(model=self, input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def stream(self, input_ids: torch.Tensor | str | None = None, **kwargs: Any):
        """Yield text pieces as they are produced — see modelcore.generate.stream."""
        from modelcore.generate import stream

        return stream(model=self, input_ids=input_ids, **kwargs)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        """Write an HF-format folder (config.json + model.safetensors) — see modelcore.loading.save_pretrained."""
        from modelcore.loading import save_pretrained

        with self.unfused():
            save_pretrained(model=self, path=path, **kwargs)
