"""AutoModel: load an HF folder or a .gguf file into the right modelcore model class, optionally quantized."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from modelcore.errors import ModelNotFoundError, UnknownArchitectureError


def model_class_for(model_type: str) -> type:
    """The nn.Module class that implements `model_type` (one Transformer serves every supported family)."""
    from modelcore.loading import SUPPORTED_MODEL_TYPES
    from modelcore.model import Transformer

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnknownArchitectureError(f"unknown model_type {model_type!r}; modelcore supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    return Transformer


def _is_bert(folder: Path) -> bool:
    """True for a folder whose config.json says model_type "bert" (served by modelcore.bert, not the decoder)."""
    cfg = folder / "config.json"
    try:
        return cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "bert"
    except (ValueError, AttributeError):  # unreadable config: load_config reports it clearly
        return False


def resolve_device(device_map: str | torch.device | None) -> torch.device:
    """'auto' -> CUDA when present else CPU; None -> CPU; otherwise the named device."""
    if device_map in (None, "auto"):
        return torch.device("cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        raise ValueError("device_map dicts (multi-device placement) are not supported; pass 'auto', 'cpu' or 'cuda'")
    return torch.device(device_map)


DEFAULT_MODE = (None, "", "auto", "default")  # "use the model's own": what a blank portal profile field means
ATTENTION_MODES = ("absorbed", "naive")  # MLA decode: weight-absorbed attention on the latent, or expanded per-head K/V
ROUTING_MODES = ("dispatch", "loop")  # MoE: run only the routed experts (batched), or the per-token reference loop


def configure_modes(model: Any, *, attention: str | None = None, routing: str | None = None) -> None:
    """Apply the portal profile's attention/routing mode to a loaded model (ValueError for a mode it does not have).

    attention: None/""/"auto"/"default" (the model's own), or for MLA models "absorbed" (absorbed decode, expanded
    prefill: the default) or "naive" (expanded K/V everywhere). routing: the defaults, or for MoE models "dispatch"
    (routed experts only: the default) or "loop" (the per-token reference loop; slow, for checking).
    GQA / dense / encoder models accept only the defaults.
    """
    from modelcore.mla import MLA
    from modelcore.moe import MoE

    mlas = [m for m in model.modules() if isinstance(m, MLA)]
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if attention not in DEFAULT_MODE:
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES} (or None for the model's default), got {attention!r}")
        if not mlas:
            raise ValueError(f"attention={attention!r} applies to MLA models (DeepSeek-V2/V3); this model uses standard "
                             "attention: leave attention unset")
        for m in mlas:
            m.impl = "naive" if attention == "naive" else "auto"
    if routing not in DEFAULT_MODE:
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES} (or None for the model's default), got {routing!r}")
        if not moes:
            raise ValueError(f"routing={routing!r} applies to mixture-of-experts models; this model has no routed "
                             "experts: leave routing unset")
        for m in moes:
            m.routing = routing


class AutoModel:
    """Factory: `AutoModel.from_pretrained(path, device_map="auto", quantization=None|"int8"|"int4", dtype=None,
    attention=None|"absorbed"|"naive", routing=None|"dispatch"|"loop")`."""

    def __init__(self) -> None:
        raise TypeError("use AutoModel.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | Path, *, device_map: str | torch.device | None = "auto", quantization: str | None = None,
                        dtype: str | torch.dtype | None = None, load_tokenizer: bool = True, attention: str | None = None,
                        routing: str | None = None, fuse: bool = True, **quant_options: Any):
        """Load a model ready for inference (eval mode, no grad). dtype defaults to the checkpoint's own.

        attention / routing: see configure_modes (None = the model's own; a mode the model lacks is a ValueError).
        fuse: concatenate q/k/v and gate/up into one matmul each (Transformer.fuse_projections) where it costs no
        extra resident memory (not for memory-mapped float weights on CPU).
        """
        from modelcore.loading import QUANT_FILE, build_model, load_config, load_state_dict, parse_dtype
        from modelcore.tokenizer import AutoTokenizer

        p = Path(path)
        if not p.exists():
            raise ModelNotFoundError(f"model path {p} does not exist")
        if quantization not in (None, "int8", "int4"):
            raise ValueError(f"quantization must be None, 'int8' or 'int4', got {quantization!r}")
        device, want_dtype = resolve_device(device_map), parse_dtype(dtype)
        tokenizer = None
        if p.is_file():
            if p.suffix != ".gguf":
                raise ModelNotFoundError(f"{p} is a file but not a .gguf; pass a model folder or a .gguf file")
            from modelcore.gguf import load_gguf

            args, sd, tokenizer = load_gguf(p, quantization=quantization)
            prequantized = {k: v for k, v in sd.items() if not isinstance(v, torch.Tensor)}
            tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
            model = build_model(args=args, state_dict=tensors, dtype=want_dtype, device=device, source=str(p),
                                pending=set(prequantized))
        elif _is_bert(p):  # encoder-only BERT family: modelcore/bert.py (MC-C)
            from modelcore.bert import BertModel

            if quantization is not None:
                raise ValueError("quantization applies to decoders; load a BERT encoder with dtype='bfloat16' instead")
            if attention not in DEFAULT_MODE or routing not in DEFAULT_MODE:
                raise ValueError("attention/routing modes apply to decoders; a BERT encoder takes only the defaults")
            bert = BertModel.from_pretrained(p, dtype=want_dtype or torch.float32).to(device)
            bert.tokenizer = AutoTokenizer.from_pretrained(p) if (p / "tokenizer.json").is_file() else None
            return bert
        else:
            args = load_config(p)
            model = build_model(args=args, state_dict=load_state_dict(p), dtype=want_dtype, device=device, source=str(p))
            prequantized = {}
            if quantization is None and (p / QUANT_FILE).is_file():
                stored = json.loads((p / QUANT_FILE).read_text(encoding="utf-8")).get("quantization")
                if isinstance(stored, dict):
                    quantization = stored.get("mode")
                    if stored.get("group_size"):
                        quant_options.setdefault("group_size", stored["group_size"])
                else:
                    quantization = stored
            if load_tokenizer and (p / "tokenizer.json").is_file():
                tokenizer = AutoTokenizer.from_pretrained(p)
        # Fusing copies the weights. Float weights are fused before quantizing (so CUDA's int4 layout, which cannot be
        # concatenated, gets fused codes) where the copy is free: on CUDA, or from a GGUF (its tensors are fresh
        # memory). A folder's float weights on CPU are memory-mapped from the file: fusing them would hold the file's
        # pages and the copies at once, so those are fused only after quantizing (the quantized codes as they are).
        float_fuse = fuse and not prequantized and (device.type == "cuda" or p.is_file())
        if float_fuse:
            model.fuse_projections()
        if quantization is not None:
            from modelcore.quant import quantize_model

            quantize_model(model, quantization, prequantized=prequantized, **quant_options)
            model.to(device)
        configure_modes(model, attention=attention, routing=routing)
        if fuse and not float_fuse and (prequantized or quantization is not None):
            model.fuse_projections()  # quantized codes concatenated as they are (GGUF int4, CPU int4 / int8 layouts)
        model.tokenizer = tokenizer
        return model
