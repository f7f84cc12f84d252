"""modelcore: a plain-PyTorch LLM core (decoders, embedders, quantization, generation). Knows nothing of Django."""
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
