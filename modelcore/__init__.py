"""modelcore: a plain-PyTorch LLM core (decoders, embedders, quantization, generation). Knows nothing of Django.

    from modelcore import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(path, device_map="auto", quantization=None)  # HF folder or .gguf; or "int8"/"int4"
    tokenizer = AutoTokenizer.from_pretrained(path)
    inputs = tokenizer(["prompt one", "prompt two"], return_tensors="pt")          # padded batch + attention_mask
    out = model.generate(**inputs, max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1, stop_strings=["\n\n"])
    for piece in model.stream("prompt", max_new_tokens=64): print(piece, end="")  # whole UTF-8 characters
    model(input_ids).logits; model.hidden_states(input_ids, attention_mask); model.save_pretrained(folder)

CLI: `python -m modelcore generate --model PATH --prompt TEXT [--chat]`, `python -m modelcore chat --model PATH`,
`python -m modelcore bench ...`.  Errors are modelcore.errors.ModelCoreError subclasses.
"""
from __future__ import annotations

from typing import Any

from modelcore.args import ModelArgs
from modelcore.errors import ModelCoreError

__all__ = ["AutoModel", "AutoTokenizer", "ModelArgs", "ModelCoreError", "Transformer", "load_embedder", "Engine"]

_LAZY = {
    "AutoModel": ("modelcore.auto", "AutoModel"),
    "AutoTokenizer": ("modelcore.tokenizer", "AutoTokenizer"),
    "Transformer": ("modelcore.model", "Transformer"),
    "load_embedder": ("modelcore.embed", "load_embedder"),
    "Engine": ("modelcore.engine", "Engine"),
}


def __getattr__(name: str) -> Any:
    """Import heavy or optional parts on first use, so a missing module never breaks `import modelcore`."""
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'modelcore' has no attribute {name!r}")
