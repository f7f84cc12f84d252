"""Decoder-only Transformer for the Llama and Qwen2 families (DeepSeek layers plug in per layer via factories).

Module names follow Hugging Face checkpoint keys, so an HF state dict loads 1:1:
``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj``, ``.input_layernorm``,
``.post_attention_layernorm``, ``.mlp.{gate,up,down}_proj``, ``model.norm``, ``lm_head``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from modelcore.args import ModelArgs
from modelcore.cache import KVCache
from modelcore.rope import RotaryEmbedding, apply_rotary

LayerCache = Any  # KVCache for GQA, modelcore.mla's cache for MLA: both follow modelcore/cache.py's API


@dataclass
class ModelOutput:
    """What Transformer.forward returns: logits (B, T, vocab) and, on request, final-norm hidden states (B, T, D)."""

    logits: torch.Tensor | None
    hidden_states: torch.Tensor | None = None


class RMSNorm(nn.Module):
    """Root-mean-square layer norm, computed in float32 like the reference."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


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

    def new_cache(self, batch: int, max_len: int, device: torch.device | str, dtype: torch.dtype) -> KVCache:
        """Allocate this layer's KV cache."""
        return KVCache(batch, max_len, self.n_kv_heads, self.head_dim, device, dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        cos, sin = self.rotary(positions, q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k_all, v_all = cache.update(positions, k, v)
            s = mask.shape[-1] if mask is not None else cache.max_len
            k, v = k_all[:b, :, :s], v_all[:b, :, :s]  # (B, Hkv, S, D)
        out = attention(q, k, v, mask, self.scale, naive=self.naive)  # (B, H, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, inter_dim: int, bias: bool = False, act: str = "silu"):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.up_proj = nn.Linear(dim, inter_dim, bias=bias)
        self.down_proj = nn.Linear(inter_dim, dim, bias=bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


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

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerCache | None, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Embeddings, the stack of blocks and the final norm (HF's `model.` prefix)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList([Block(args, i) for i in range(args.n_layers)])
        self.norm = RMSNorm(args.dim, args.rms_norm_eps)


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

    def set_naive_attention(self, naive: bool) -> None:
        """Switch every attention to the explicit-softmax reference (tests)."""
        for layer in self.model.layers:
            if hasattr(layer.self_attn, "naive"):
                layer.self_attn.naive = naive

    def forward_hidden(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, D).

        positions: (B, T) logical positions; default from attention_mask, else 0..T-1.
        cache: from new_cache(); K/V are written at `positions`, queries see cache slots <= their position.
        attention_mask: (B, T) 0/1 for padded batches (any padding side).
        """
        b, t = input_ids.shape
        if positions is None:
            if attention_mask is not None:
                positions = positions_from_mask(attention_mask.to(input_ids.device))
            else:
                positions = torch.arange(t, device=input_ids.device).expand(b, t)
        if cache is None:
            valid = attention_mask.to(input_ids.device) if attention_mask is not None else None
            mask = build_mask(positions, positions, valid, self.args.sliding_window)
        else:
            s = int(positions.max()) + 1
            assert s <= cache[0].max_len, f"position {s - 1} beyond cache length {cache[0].max_len}"
            mask = build_mask(positions, torch.arange(s, device=input_ids.device).expand(b, s), window=self.args.sliding_window)
        h = self.model.embed_tokens(input_ids)  # (B, T, D)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, cache[i] if cache is not None else None, mask)
        return self.model.norm(h)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, cache: list[LayerCache] | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False) -> ModelOutput:
        """Logits (B, T, vocab) — or (B, 1, vocab) for the last token only when last_only=True."""
        h = self.forward_hidden(input_ids, positions, cache, attention_mask)
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

        save_pretrained(model=self, path=path, **kwargs)
