"""ModelArgs: every hyper-parameter of the decoder families modelcore runs (Llama, Qwen2, DeepSeek-V2/V3)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder-only Transformer; derived fields are filled in __post_init__."""

    model_type: str = "llama"
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None -> n_heads (MHA)
    head_dim: int | None = None  # None -> dim // n_heads
    inter_dim: int = 11008  # intermediate_size of dense MLPs
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # q/k/v bias (Qwen2: True)
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    dtype: str = "float32"
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral: each query sees only the last `sliding_window` positions
    # attention variant: "gqa" (covers MHA/MQA) or "mla" (DeepSeek-V2/V3)
    attention: str = "gqa"
    q_lora_rank: int = 0  # 0 -> no low-rank q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # mixture of experts (DeepSeekMoE)
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    n_activated_experts: int = 0  # num_experts_per_tok
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    score_func: str = "softmax"  # "softmax" | "sigmoid"
    route_scale: float = 1.0
    norm_topk_prob: bool = False
    topk_method: str = "greedy"
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    moe_inter_dim: int = 0
    # anything else from config.json that a layer variant may want
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            assert self.dim % self.n_heads == 0, "dim must be divisible by n_heads"
            self.head_dim = self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads"
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        self.eos_token_id = list(self.eos_token_id or [])
        assert self.attention in ("gqa", "mla"), f"unknown attention variant {self.attention!r}"

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.n_heads // self.n_kv_heads

    @property
    def rope_dim(self) -> int:
        """Number of channels per head that RoPE rotates."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        """True when layer `layer_id` uses the MoE feed-forward."""
        return bool(self.n_routed_experts) and layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON-serialisable) of every field."""
        return asdict(self)
