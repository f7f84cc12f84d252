"""BERT-family encoder (absolute positions, post-LN layers, GELU) with HF checkpoint names.

Module names follow the Hugging Face ``BertModel`` keys (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query`` ...) so a checkpoint loads 1:1.
``BertModel.fuse_qkv()`` swaps the three projections for one ``qkv`` linear (faster inference).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

_ACTS = {"gelu": "none", "gelu_python": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh"}


@dataclass
class BertArgs:
    """Encoder hyper-parameters (names from the literature; HF names mapped in ``from_hf_config``)."""

    vocab_size: int = 30522
    dim: int = 384
    n_layers: int = 6
    n_heads: int = 12
    inter_dim: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    model_type: str = "bert"
    head_dim: int = 0

    def __post_init__(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"hidden_size {self.dim} is not divisible by num_attention_heads {self.n_heads}")
        self.head_dim = self.dim // self.n_heads
        if self.hidden_act not in _ACTS and self.hidden_act != "relu":
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} for a BERT encoder")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "BertArgs":
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"position_embedding_type {pos!r} is not supported (only 'absolute')")
        return cls(
            vocab_size=cfg["vocab_size"], dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"], inter_dim=cfg["intermediate_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 512),
            type_vocab_size=cfg.get("type_vocab_size", 2), norm_eps=cfg.get("layer_norm_eps", 1e-12),
            hidden_act=cfg.get("hidden_act", "gelu"), pad_token_id=cfg.get("pad_token_id", 0) or 0,
            model_type=cfg.get("model_type", "bert"),
        )


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.word_embeddings = nn.Embedding(args.vocab_size, args.dim, padding_idx=args.pad_token_id)
        self.position_embeddings = nn.Embedding(args.max_position_embeddings, args.dim)
        self.token_type_embeddings = nn.Embedding(args.type_vocab_size, args.dim)
        self.LayerNorm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        T = input_ids.shape[1]
        pos = torch.arange(T, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(pos)[None]  # (B, T, D)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention projections (query/key/value, or one fused ``qkv``)."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        self.query = nn.Linear(args.dim, args.dim)
        self.key = nn.Linear(args.dim, args.dim)
        self.value = nn.Linear(args.dim, args.dim)
        self.qkv: nn.Linear | None = None

    def fuse(self) -> None:
        """Replace query/key/value by one (3D, D) linear: one matmul instead of three."""
        w = torch.cat([self.query.weight, self.key.weight, self.value.weight])
        b = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        self.qkv = nn.Linear(w.shape[1], w.shape[0], device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.qkv.weight.copy_(w)
            self.qkv.bias.copy_(b)
        del self.query, self.key, self.value

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, naive: bool = False) -> torch.Tensor:
        B, T, D = x.shape
        if self.qkv is not None:
            q, k, v = self.qkv(x).split(D, dim=-1)
        else:
            q, k, v = self.query(x), self.key(x), self.value(x)
        q, k, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, Dh)
        if naive:
            scores = q @ k.transpose(-1, -2) / self.head_dim**0.5  # (B, H, T, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(B, T, D)  # (B, T, D)


class BertSelfOutput(nn.Module):
    """Attention output projection + residual + post-LayerNorm."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.dim, args.dim)
        self.LayerNorm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class BertAttention(nn.Module):
    """Self-attention sub-layer."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.self = BertSelfAttention(args)
        self.output = BertSelfOutput(args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, naive: bool = False) -> torch.Tensor:
        return self.output(self.self(x, mask, naive), x)


class BertIntermediate(nn.Module):
    """Feed-forward up projection + GELU."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.dim, args.inter_dim)
        self.act = args.hidden_act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dense(x)
        return F.relu(h) if self.act == "relu" else F.gelu(h, approximate=_ACTS[self.act])


class BertOutput(nn.Module):
    """Feed-forward down projection + residual + post-LayerNorm."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.dense = nn.Linear(args.inter_dim, args.dim)
        self.LayerNorm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + x)


class BertLayer(nn.Module):
    """One post-LN encoder layer: attention then feed-forward."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.attention = BertAttention(args)
        self.intermediate = BertIntermediate(args)
        self.output = BertOutput(args)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, naive: bool = False) -> torch.Tensor:
        x = self.attention(x, mask, naive)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    """Stack of encoder layers."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(args) for _ in range(args.n_layers))


class BertModel(nn.Module):
    """BERT encoder returning the last hidden states (B, T, D); no pooler head."""

    def __init__(self, args: BertArgs):
        super().__init__()
        self.args = args
        self.embeddings = BertEmbeddings(args)
        self.encoder = BertEncoder(args)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        naive: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) of 1/0 -> hidden states (B, T, D)."""
        assert input_ids.dim() == 2, "input_ids must be (B, T)"
        if input_ids.shape[1] > self.args.max_position_embeddings:
            raise ValueError(
                f"sequence of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                f"{self.args.max_position_embeddings}"
            )
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): keys each query may see
        x = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask, naive)
        return x

    def fuse_qkv(self) -> "BertModel":
        """Fuse every layer's query/key/value projections (inference only)."""
        for layer in self.encoder.layer:
            layer.attention.self.fuse()
        return self

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32) -> "BertModel":
        """Load an HF BERT folder (config.json + model.safetensors); ignores pooler/heads."""
        from safetensors.torch import load_file

        folder = Path(path)
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        for f in (cfg_file, weights):
            if not f.is_file():
                raise FileNotFoundError(f"BERT checkpoint file {f} is missing")
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("model_type") not in ("bert", None):
            raise ValueError(f"{folder} has model_type {cfg.get('model_type')!r}, expected 'bert'")
        args = BertArgs.from_hf_config(cfg)
        with torch.device("meta"):
            model = cls(args)
        sd = load_file(str(weights))
        prefix = "bert." if any(k.startswith("bert.") for k in sd) else ""
        expected = set(model.state_dict())
        state = {k[len(prefix):]: v.to(dtype) for k, v in sd.items() if k.startswith(prefix) and k[len(prefix):] in expected}
        missing = expected - set(state)
        if missing:
            raise ValueError(f"{weights} lacks {len(missing)} encoder tensors, e.g. {sorted(missing)[:3]}")
        model.load_state_dict(state, assign=True)
        return model.eval()
