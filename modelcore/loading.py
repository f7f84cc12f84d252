"""HF checkpoint folders <-> modelcore: config.json -> ModelArgs, lazy safetensors loading, save_pretrained."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from modelcore.args import ModelArgs
from modelcore.errors import CheckpointError, ModelNotFoundError, UnknownArchitectureError
from modelcore.safetensors_io import load_mmap

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                 "deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
QUANT_FILE = "modelcore_quantization.json"
DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / torch.bfloat16 / None -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {sorted(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file, turning a syntax error into a CheckpointError that names the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: invalid JSON ({exc})") from exc


def config_to_args(config: dict[str, Any]) -> ModelArgs:
    """Translate an HF config.json dict into ModelArgs (Llama, Qwen2, Mistral, DeepSeek-V2/V3)."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = config.get("architectures")
        raise UnknownArchitectureError(
            f"unknown model_type {model_type!r} (architectures={arch}); modelcore supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    c = config
    if model_type == "qwen2" and c.get("use_sliding_window"):
        raise UnknownArchitectureError("Qwen2 with use_sliding_window=true (per-layer windows) is not supported by modelcore")
    is_ds = model_type.startswith("deepseek")
    eos = c.get("eos_token_id")
    args = ModelArgs(
        model_type=model_type,
        vocab_size=c["vocab_size"],
        dim=c["hidden_size"],
        n_layers=c["num_hidden_layers"],
        n_heads=c["num_attention_heads"],
        n_kv_heads=(None if is_ds else c.get("num_key_value_heads")) or c["num_attention_heads"],  # MLA: no kv heads
        head_dim=c.get("head_dim") if not is_ds else None,
        inter_dim=c["intermediate_size"],
        max_position_embeddings=c.get("max_position_embeddings", 4096),
        rms_norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=(c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
        rope_scaling=_rope_scaling(c),
        attention_bias=True if model_type == "qwen2" else bool(c.get("attention_bias", False)),
        o_bias=False if model_type == "qwen2" else bool(c.get("attention_bias", False)),
        mlp_bias=bool(c.get("mlp_bias", False)),
        tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=[eos] if isinstance(eos, int) else list(eos or []),
        pad_token_id=c.get("pad_token_id"),
        dtype=str(c.get("dtype") or c.get("torch_dtype") or "float32").removeprefix("torch."),
        hidden_act=c.get("hidden_act", "silu"),
        sliding_window=c.get("sliding_window") if model_type == "mistral" else None,
        attention="mla" if is_ds else "gqa",
        q_lora_rank=c.get("q_lora_rank") or 0,
        kv_lora_rank=c.get("kv_lora_rank") or 512,
        qk_nope_head_dim=c.get("qk_nope_head_dim") or 128,
        qk_rope_head_dim=c.get("qk_rope_head_dim") or 64,
        v_head_dim=c.get("v_head_dim") or 128,
        n_routed_experts=c.get("n_routed_experts") or 0,
        n_shared_experts=c.get("n_shared_experts") or 0,
        n_activated_experts=c.get("num_experts_per_tok") or 0,
        n_expert_groups=c.get("n_group") or 1,
        n_limited_groups=c.get("topk_group") or 1,
        score_func=c.get("scoring_func", "softmax"),
        route_scale=c.get("routed_scaling_factor") or 1.0,
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        topk_method=c.get("topk_method", "greedy"),
        first_k_dense_replace=c.get("first_k_dense_replace") or 0,
        moe_layer_freq=c.get("moe_layer_freq") or 1,
        moe_inter_dim=c.get("moe_intermediate_size") or 0,
        extra={"hf_config": dict(c)},
    )
    if is_ds:  # DeepSeek specifics (V3 sigmoid/noaux_tc defaults, rope_interleave): modelcore/deepseek_config.py
        from modelcore.deepseek_config import deepseek_args

        args = deepseek_args(args=args, config=c)
    return args


def _rope_scaling(c: dict[str, Any]) -> dict[str, Any] | None:
    """rope_scaling (transformers 4) or rope_parameters (transformers 5) without the default type."""
    rs = c.get("rope_scaling") or c.get("rope_parameters")
    if not rs:
        return None
    rs = dict(rs)
    kind = rs.get("rope_type", rs.get("type", "default"))
    return None if kind == "default" else rs


def args_to_config(args: ModelArgs) -> dict[str, Any]:
    """ModelArgs -> HF config.json dict that transformers can load (keys of the original config kept)."""
    c: dict[str, Any] = dict(args.extra.get("hf_config") or {})
    c.update({
        "model_type": args.model_type,
        "architectures": [ARCHITECTURES.get(args.model_type, "LlamaForCausalLM")],
        "vocab_size": args.vocab_size, "hidden_size": args.dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "intermediate_size": args.inter_dim,
        "max_position_embeddings": args.max_position_embeddings, "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta, "tie_word_embeddings": args.tie_word_embeddings, "hidden_act": args.hidden_act,
        "bos_token_id": args.bos_token_id, "pad_token_id": args.pad_token_id,
        "eos_token_id": args.eos_token_id[0] if len(args.eos_token_id) == 1 else (args.eos_token_id or None),
        "dtype": args.dtype,
    })
    c.pop("torch_dtype", None)
    if args.rope_scaling:
        c["rope_scaling"] = dict(args.rope_scaling)
        c["rope_parameters"] = {**args.rope_scaling, "rope_theta": args.rope_theta}
    if args.model_type in ("llama", "mistral"):
        c.update({"head_dim": args.head_dim, "attention_bias": args.attention_bias, "mlp_bias": args.mlp_bias})
    if args.model_type == "mistral":
        c["sliding_window"] = args.sliding_window
    if args.model_type == "qwen2":
        c.setdefault("use_sliding_window", False)
    if args.attention == "mla" or args.n_routed_experts:
        c.update({
            "q_lora_rank": args.q_lora_rank or None, "kv_lora_rank": args.kv_lora_rank,
            "qk_nope_head_dim": args.qk_nope_head_dim, "qk_rope_head_dim": args.qk_rope_head_dim,
            "v_head_dim": args.v_head_dim, "n_routed_experts": args.n_routed_experts or None,
            "n_shared_experts": args.n_shared_experts or None, "num_experts_per_tok": args.n_activated_experts or None,
            "n_group": args.n_expert_groups, "topk_group": args.n_limited_groups, "scoring_func": args.score_func,
            "routed_scaling_factor": args.route_scale, "norm_topk_prob": args.norm_topk_prob, "topk_method": args.topk_method,
            "first_k_dense_replace": args.first_k_dense_replace, "moe_layer_freq": args.moe_layer_freq,
            "moe_intermediate_size": args.moe_inter_dim or None,
        })
    return c


def load_config(path: Path) -> ModelArgs:
    """ModelArgs from a folder's config.json (+ generation_config.json eos ids)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelNotFoundError(f"{path}: no config.json — expected a Hugging Face model folder or a .gguf file")
    args = config_to_args(read_json(cfg_path))
    gen_path = path / "generation_config.json"
    if gen_path.is_file():
        eos = read_json(gen_path).get("eos_token_id")
        for e in [eos] if isinstance(eos, int) else (eos or []):
            if e not in args.eos_token_id:
                args.eos_token_id.append(e)
    return args


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder: model.safetensors or the shards listed in model.safetensors.index.json (memory-mapped)."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        weight_map: dict[str, str] = read_json(index).get("weight_map", {})
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = path / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{path}: shard {shard} listed in model.safetensors.index.json is missing")
            out.update(load_mmap(shard_path))
        missing = sorted(set(weight_map) - set(out))
        if missing:
            raise CheckpointError(f"{path}: tensors listed in the index are missing from the shards: {missing[:5]}")
        return out
    if single.is_file():
        return load_mmap(single)
    others = sorted(p.name for p in path.glob("*.safetensors"))
    if others:
        out = {}
        for name in others:
            out.update(load_mmap(path / name))
        return out
    raise ModelNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors file")


def build_model(*, args: ModelArgs, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", source: str = "checkpoint", pending: set[str] | None = None):
    """Instantiate the model on 'meta' and assign the tensors (no copy unless dtype/device change).

    `pending`: weight names supplied later (pre-quantized GGUF weights that quantize_model swaps in).
    """
    from modelcore.auto import model_class_for

    cls = model_class_for(args.model_type)
    with torch.device("meta"):
        model = cls(args)
    expected = set(model.state_dict().keys()) - set(pending or ())
    if args.attention == "mla":  # fused 3-D expert tensors -> per-expert Linear keys
        from modelcore.deepseek_config import split_fused_experts

        state_dict = split_fused_experts(state_dict)
    sd = {k: v for k, v in state_dict.items() if "rotary_emb.inv_freq" not in k}
    if args.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the config ({args.model_type}): "
                              f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    ref = model.state_dict()
    for k, v in sd.items():
        if tuple(v.shape) != tuple(ref[k].shape):
            raise CheckpointError(f"{source}: tensor {k} has shape {tuple(v.shape)}, config needs {tuple(ref[k].shape)}")
        if dtype is not None and v.dtype != dtype and v.is_floating_point():
            sd[k] = v.to(dtype)
        if str(device) != "cpu":
            sd[k] = sd[k].to(device)
    model.load_state_dict(sd, strict=False, assign=True)
    model.tie_weights()
    model.args.dtype = str(next(iter(sd.values())).dtype).removeprefix("torch.") if sd else model.args.dtype
    return model.eval().requires_grad_(False)


def save_pretrained(*, model, path: str | Path, tokenizer: Any = None) -> None:
    """Write config.json + model.safetensors (float weights) [+ tokenizer files, + modelcore_quantization.json]."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantized: set[str] = set()
    for name, module in model.named_modules():
        weight = _dequantized(module, model.dtype)
        if weight is not None:  # quantized module: store float weights
            quantized.add(name)
            tensors[f"{name}.weight"] = weight.detach().contiguous()
            if getattr(module, "bias", None) is not None:
                tensors[f"{name}.bias"] = module.bias.detach().contiguous()
    for name, t in model.state_dict().items():
        if name.rsplit(".", 1)[0] in quantized:
            continue  # packed ints / scales of a quantized module
        tensors.setdefault(name, t.detach().contiguous())
    if model.args.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    tensors = {k: v.cpu() for k, v in tensors.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = args_to_config(model.args)
    config["dtype"] = str(model.dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = {"bos_token_id": model.args.bos_token_id, "eos_token_id": model.args.eos_token_id or None,
           "pad_token_id": model.args.pad_token_id}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
    qfile = out / QUANT_FILE
    if getattr(model, "quantization", None):
        qfile.write_text(json.dumps({"quantization": model.quantization}, indent=2), encoding="utf-8")
    elif qfile.exists():
        qfile.unlink()
    tok = tokenizer or getattr(model, "tokenizer", None)
    if tok is not None and hasattr(tok, "save_pretrained"):
        tok.save_pretrained(out)


def _dequantized(module: torch.nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """Float weight of a quantized stand-in for nn.Linear / nn.Embedding, or None for float modules.

    Uses the module's own dequantize() when it has one; otherwise reads the weight out of the module's forward
    (identity input for a linear, every id for an embedding), so any quantized layout is saved as it computes.
    """
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        return None
    if callable(getattr(module, "dequantize", None)):
        try:
            return module.dequantize().to(dtype)
        except NotImplementedError:  # a packed layout that cannot be read back (CUDA int4): ask the forward
            pass
    with torch.no_grad():
        if hasattr(module, "in_features") and hasattr(module, "out_features"):
            device = next(iter(module.buffers())).device
            eye = torch.eye(module.in_features, dtype=dtype, device=device)
            w_t = module(eye)  # (K, N) = W^T + b
            if getattr(module, "bias", None) is not None:
                w_t = w_t - module.bias.to(w_t.dtype)
            return w_t.t().to(dtype)
        if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
            device = next(iter(module.buffers())).device
            return module(torch.arange(module.num_embeddings, device=device)).to(dtype)
    return None
