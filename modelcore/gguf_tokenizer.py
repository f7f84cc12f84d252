"""Tokenizer from GGUF metadata: `tokenizer.ggml.*` (BPE vocab, merges, token types, special ids) + chat template.

Only byte-level BPE (`tokenizer.ggml.model == "gpt2"`, used by Llama-3, Qwen2, SmolLM2 files) is supported;
the result is a `tokenizers.Tokenizer` wrapped in modelcore's tokenizer class.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .errors import TokenizerError

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are special, never split


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def backend_from_gguf(reader: Any) -> Tokenizer:
    """Byte-level BPE `tokenizers.Tokenizer` from the GGUF vocab and merges."""
    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise TokenizerError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens") or []
    merges_raw: list[str] = _field(reader, "tokenizer.ggml.merges") or []
    if not tokens or not merges_raw:
        raise TokenizerError("GGUF file has no tokenizer.ggml.tokens / tokenizer.ggml.merges")
    types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {tok: i for i, tok in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in merges_raw]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if int(ty) in (_CONTROL, _USER_DEFINED)]
    tok.add_special_tokens(special)
    return tok


def special_tokens(reader: Any) -> dict[str, str | None]:
    """bos/eos/unk/pad token strings named by the `tokenizer.ggml.*_token_id` fields."""
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens") or []
    out: dict[str, str | None] = {}
    for name in ("bos", "eos", "unk", "pad"):
        key = "padding" if name == "pad" else ("unknown" if name == "unk" else name)
        idx = _field(reader, f"tokenizer.ggml.{key}_token_id")
        out[f"{name}_token"] = tokens[int(idx)] if idx is not None and 0 <= int(idx) < len(tokens) else None
    return out


def tokenizer_from_gguf(reader: Any) -> Any:
    """modelcore `AutoTokenizer` built from a GGUF reader's metadata (BOS prepended when `add_bos_token`)."""
    backend = backend_from_gguf(reader)
    specials = special_tokens(reader)
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
    bos = specials["bos_token"]
    if add_bos and bos is not None:
        bos_id = backend.token_to_id(bos)
        backend.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])
    from .tokenizer import AutoTokenizer

    config: dict[str, Any] = {**specials, "add_bos_token": add_bos}
    return AutoTokenizer(backend, config, _field(reader, "tokenizer.chat_template"))
