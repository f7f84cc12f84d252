"""DeepSeek-V2/V3 branch of config mapping (config.json -> ModelArgs) and checkpoint-key mapping.

What differs from the generic mapping in modelcore.loading.config_to_args, following transformers'
DeepseekV2/V3 modelling (the reference our parity tests compare against):

* MLA has no separate key/value heads: n_kv_heads = n_heads whatever num_key_value_heads says.
* V3 always scores with sigmoid + e_score_correction_bias and picks groups by the sum of their top-2
  ("noaux_tc"), even when config.json (as written by transformers 5) omits scoring_func / topk_method.
* V2 scores with softmax; topk_method "greedy" or "group_limited_greedy"; no top-k renormalisation (as in
  transformers; every released V2 config has norm_topk_prob false anyway).
* every layer from first_k_dense_replace on is MoE (transformers ignores moe_layer_freq; DeepSeek ships 1).
* rope_interleave (V3, default True; V2 always interleaved) goes to args.extra["rope_interleave"].

Checkpoints whose experts are fused into 3-D tensors (mlp.experts.gate_up_proj (E, 2I, D),
mlp.experts.down_proj (E, D, I)) are split into per-expert Linear keys by `split_fused_experts`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from modelcore.args import ModelArgs
from modelcore.errors import CheckpointError, UnknownArchitectureError

DEEPSEEK_MODEL_TYPES = ("deepseek_v2", "deepseek_v3")
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def deepseek_config_to_args(config: dict[str, Any]) -> ModelArgs:
    """ModelArgs for a DeepSeek-V2/V3 config.json dict (the generic mapping, then `deepseek_args`)."""
    from modelcore.loading import config_to_args  # calls deepseek_args for deepseek_* model types

    if config.get("model_type") not in DEEPSEEK_MODEL_TYPES:
        raise UnknownArchitectureError(f"not a DeepSeek-V2/V3 config: model_type={config.get('model_type')!r}")
    return config_to_args(config)


def deepseek_args(*, args: ModelArgs, config: dict[str, Any]) -> ModelArgs:
    """Correct the generic mapping's ModelArgs for DeepSeek-V2/V3 (hook called by loading.config_to_args)."""
    c = config
    model_type = c.get("model_type")
    if model_type not in DEEPSEEK_MODEL_TYPES:
        raise UnknownArchitectureError(f"not a DeepSeek-V2/V3 config: model_type={model_type!r}")
    v3 = model_type == "deepseek_v3"
    n_experts = c.get("n_routed_experts") or 0
    n_group = c.get("n_group") or 1
    if v3:
        score_func, topk_method = "sigmoid", "noaux_tc"
    else:
        score_func, topk_method = "softmax", c.get("topk_method") or "greedy"
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise UnknownArchitectureError(f"deepseek_v2 topk_method {topk_method!r} is not supported "
                                           "(expected 'greedy' or 'group_limited_greedy')")
    if n_experts and n_experts % n_group:
        raise UnknownArchitectureError(f"n_routed_experts={n_experts} is not a multiple of n_group={n_group}")
    if n_experts and not 0 < (c.get("num_experts_per_tok") or 0) <= n_experts:
        raise UnknownArchitectureError(f"num_experts_per_tok={c.get('num_experts_per_tok')!r} must be in 1..{n_experts}")
    extra = dict(args.extra)
    extra["rope_interleave"] = bool(c.get("rope_interleave", True)) if v3 else True
    return dataclasses.replace(
        args,
        n_kv_heads=args.n_heads,  # MLA: every head reads the shared latent
        attention="mla",
        score_func=score_func,
        topk_method=topk_method,
        n_expert_groups=n_group,
        n_limited_groups=c.get("topk_group") or 1,
        norm_topk_prob=bool(c.get("norm_topk_prob", True)) if v3 else False,  # transformers' V2 never renormalises
        route_scale=float(c.get("routed_scaling_factor") or 1.0),
        moe_layer_freq=1,
        first_k_dense_replace=c.get("first_k_dense_replace") or 0,
        extra=extra,
    )


def split_fused_experts(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map fused 3-D expert tensors to per-expert `experts.{j}.{gate,up,down}_proj.weight` keys (others unchanged)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        m = _FUSED.match(key)
        if m is None:
            out[key] = t
            continue
        prefix, kind = m["prefix"], m["kind"]
        if t.dim() != 3:
            raise CheckpointError(f"{key}: fused expert tensor should be 3-D, got shape {tuple(t.shape)}")
        for j in range(t.shape[0]):
            if kind == "gate_up_proj":
                gate, up = t[j].chunk(2, dim=0)  # (2I, D) -> (I, D), (I, D)
                out[f"{prefix}.{j}.gate_proj.weight"] = gate
                out[f"{prefix}.{j}.up_proj.weight"] = up
            else:
                out[f"{prefix}.{j}.down_proj.weight"] = t[j]  # (D, I)
    return out
