"""Sentence embeddings: ``load_embedder(path)`` -> an object with ``embed(texts) -> (N, dim)`` L2-normalised float32.

- BERT folders (e.g. all-MiniLM-L6-v2): our ``BertModel``, mean pooling over the attention mask, L2 normalise.
- Decoder checkpoints (HF folder or ``.gguf``): mean-pooled final-norm hidden states of the generator
  (``Transformer.hidden_states``), L2 normalise.
Texts are sorted by token length and batched with their neighbours, so batches carry little padding;
results come back in the caller's order and equal single-item results.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tokenizers import Tokenizer

from modelcore.bert import BertModel
from modelcore.defaults import default_encoder_path, embed_dtype_from_env

log = logging.getLogger(__name__)

# Probe texts for the bfloat16 self-check at load (English, Chinese, numbers).
_PROBE = [
    "What is the capital of France?",
    "Net revenue rose 12% to $4.2 billion in the quarter ended June 30, 2023.",
    "公司第二季度营业收入同比增长百分之十二。",
]
_BF16_MIN_COSINE = 0.999

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DECODER_TYPES = ("llama", "qwen2", "mistral", "deepseek_v2", "deepseek_v3", "qwen3")


class Embedder(Protocol):
    """What ingestion and retrieval code against."""

    name: str
    dim: int
    max_tokens: int
    tokenizer: Tokenizer
    languages: frozenset[str] | None  # from the model card; None: multilingual or not stated

    def embed(self, texts: list[str], *, batch_size: int = 32) -> np.ndarray: ...

    def count_tokens(self, text: str) -> int: ...

    def token_starts(self, text: str) -> list[int]: ...


def check_texts(texts: object, batch_size: int) -> list[str]:
    """Validate ``embed`` arguments with messages that say what is wrong."""
    if isinstance(texts, str):
        raise TypeError("embed() takes a list of strings, not a single string: wrap it as [text]")
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"embed() takes a list of strings, got {type(texts).__name__}")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"embed() texts must all be str; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return list(texts)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (B, T, D) over positions where mask (B, T) is 1, then L2-normalised (B, D)."""
    hidden = hidden.float()
    m = mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1)


def length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pooled_batches(ids: list[list[int]], out: np.ndarray, *, batch_size: int, pad_id: int, hidden) -> np.ndarray:
    """Run right-padded, length-sorted batches through ``hidden(input_ids, mask) -> (B, T, D)``; mean-pool into ``out``."""
    for batch in length_batches([len(x) for x in ids], batch_size):
        T = max(len(ids[i]) for i in batch)
        input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for row, i in enumerate(batch):
            input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
            mask[row, : len(ids[i])] = 1
        out[batch] = mean_pool(hidden(input_ids, mask), mask).numpy()  # (B, D)
    return out


def model_card_languages(folder: Path) -> frozenset[str] | None:
    """Languages a model card (README.md front matter, ``language:``) declares; None when it says
    "multilingual", lists more than a few, or is absent."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    lines = card.read_text(errors="replace").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    found: list[str] = []
    in_list = False
    for line in lines[1:]:
        if line.strip() == "---":
            break
        if line.startswith("language:"):
            value = line.split(":", 1)[1].strip()
            found += [v.strip(" '\"") for v in value.strip("[]").split(",") if v.strip()]
            in_list = not value
        elif in_list and line.lstrip().startswith("- "):
            found.append(line.strip()[2:].strip(" '\""))
        else:
            in_list = False
    langs = {v.lower() for v in found if v}
    if not langs or "multilingual" in langs or len(langs) > 3:
        return None
    return frozenset(langs)


class PooledEmbedder:
    """Shared part of the embedders: token counting and mean-pooled, L2-normalised batches."""

    dim: int
    tokenizer: Tokenizer
    _pad_id: int
    languages: frozenset[str] | None = None

    def count_tokens(self, text: str) -> int:
        """Number of tokens of ``text`` without special tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"count_tokens() takes a str, got {type(text).__name__}")
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def token_starts(self, text: str) -> list[int]:
        """Start offset (in characters of ``text``) of each token ``count_tokens`` counts, from one encoding."""
        return [start for start, _ in self.tokenizer.encode(text, add_special_tokens=False).offsets]

    @torch.inference_mode()
    def embed(self, texts: list[str], *, batch_size: int = 32) -> np.ndarray:
        """Embed texts -> float32 (N, dim), rows L2-normalised, in input order."""
        texts = check_texts(texts, batch_size)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        return pooled_batches(self._token_ids(texts), out, batch_size=batch_size, pad_id=self._pad_id, hidden=self._hidden)


class BertEmbedder(PooledEmbedder):
    """Mean-pooled, L2-normalised BERT sentence embeddings."""

    def __init__(self, model: BertModel, tokenizer: Tokenizer, *, name: str, max_tokens: int):
        self.model = model
        self.name = name
        self.dim = model.args.dim
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer  # no truncation/padding: for chunkers and count_tokens
        self._encoder = Tokenizer.from_str(tokenizer.to_str())
        self._encoder.enable_truncation(max_length=max_tokens)
        self._pad_id = model.args.pad_token_id

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._encoder.encode_batch(texts)]  # [CLS] ... [SEP], truncated

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, mask)


def _torch_dtype(dtype: str | None) -> torch.dtype:
    """Compute dtype: None -> $KD_EMBED_DTYPE, else bfloat16 on CPUs with bf16 units (GEMMs ~2x faster), else float32."""
    name = dtype or embed_dtype_from_env()
    if name not in _DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def _bert_max_tokens(folder: Path, model: BertModel) -> int:
    """Truncation length: sentence-transformers' max_seq_length if given, else the model's limit, at most 512."""
    limit = min(model.args.max_position_embeddings, 512)
    st = folder / "sentence_bert_config.json"
    if st.is_file():
        return min(int(json.loads(st.read_text()).get("max_seq_length", limit)), limit)
    tc = folder / "tokenizer_config.json"
    if tc.is_file():
        return min(int(json.loads(tc.read_text()).get("model_max_length", limit)), limit)
    return limit


def _check_pooling(folder: Path) -> None:
    cfg = folder / "1_Pooling" / "config.json"
    if cfg.is_file():
        pooling = json.loads(cfg.read_text())
        if not pooling.get("pooling_mode_mean_tokens", True):
            modes = [k for k, v in pooling.items() if k.startswith("pooling_mode") and v]
            raise ValueError(f"{folder} asks for pooling {modes}; only mean pooling is supported")


def load_bert_embedder(path: str | Path, *, dtype: str | None = None) -> BertEmbedder:
    """Load a sentence-transformers BERT folder as a mean-pooling embedder (dtype "float32" or "bfloat16")."""
    folder = Path(path)
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} is missing: a BERT embedder needs the fast tokenizer file")
    _check_pooling(folder)
    want = _torch_dtype(dtype)
    model = BertModel.from_pretrained(folder, dtype=torch.float32).fuse_qkv()
    tokenizer = Tokenizer.from_file(str(tok_file))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    name = folder.name if folder.name != "model" else folder.parent.name
    exact = BertEmbedder(model, tokenizer, name=name, max_tokens=_bert_max_tokens(folder, model))
    exact.languages = model_card_languages(folder)
    if want == torch.float32:
        return exact
    # bfloat16 is ~2x faster where the CPU has bf16 units, but some environments make torch's bf16
    # kernels wrong (seen: OMP_THREAD_LIMIT=1). Check against float32 once; keep float32 if they disagree.
    fast = BertEmbedder(copy.deepcopy(model).to(want), tokenizer, name=name, max_tokens=exact.max_tokens)
    fast.languages = exact.languages
    cosine = float((exact.embed(_PROBE) * fast.embed(_PROBE)).sum(axis=1).min())
    if cosine < _BF16_MIN_COSINE:
        log.warning("bfloat16 embeddings disagree with float32 here (cosine %.3f): using float32", cosine)
        return exact
    return fast


class DecoderEmbedder(PooledEmbedder):
    """Mean-pooled, L2-normalised final hidden states of a decoder LLM."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, name: str, max_tokens: int, pad_id: int):
        self.model = model
        self.name = name
        self.dim = model.args.dim
        self.max_tokens = max_tokens
        self.tokenizer = tokenizer
        self._pad_id = pad_id

    def _token_ids(self, texts: list[str]) -> list[list[int]]:
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [e.ids[: self.max_tokens] or [self._pad_id] for e in encs]  # right padding suits a causal model

    def _hidden(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.hidden_states(input_ids, mask)


def load_decoder_embedder(path: Path, *, quantize: str | None = None, max_tokens: int = 512) -> DecoderEmbedder:
    """Load a decoder (HF folder or .gguf) through modelcore's AutoModel as a mean-pooling embedder."""
    from modelcore.auto import AutoModel
    from modelcore.tokenizer import AutoTokenizer

    model = AutoModel.from_pretrained(str(path), quantization=quantize)
    tok = model.tokenizer or AutoTokenizer.from_pretrained(str(path))
    raw = getattr(tok, "backend", None)
    if not isinstance(raw, Tokenizer):
        raise TypeError(f"tokenizer of {path} does not expose a `tokenizers.Tokenizer`; cannot embed with it")
    raw = Tokenizer.from_str(raw.to_str())
    raw.no_truncation()
    raw.no_padding()
    args = model.args
    pad = args.pad_token_id if args.pad_token_id is not None else 0  # masked out: any valid id will do
    limit = min(max_tokens, 512, args.max_position_embeddings)
    return DecoderEmbedder(model.eval(), raw, name=path.stem if path.is_file() else path.name, max_tokens=limit, pad_id=pad)


def _detect_kind(path: Path) -> str:
    if path.is_file() and path.suffix == ".gguf":
        return "decoder"
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} is neither a .gguf file nor a model folder with config.json")
    model_type = json.loads(cfg.read_text()).get("model_type")
    if model_type == "bert":
        return "bert"
    if model_type in DECODER_TYPES:
        return "decoder"
    raise ValueError(f"{path}: model_type {model_type!r} is not an embedding model we know (bert or a decoder)")


def load_embedder(
    path: str | Path | None = None, *, kind: str | None = None, dtype: str | None = None, quantize: str | None = None
) -> Embedder:
    """Load an embedder: None -> $KD_EMBED_MODEL or the bundled all-MiniLM-L6-v2; kind "bert"|"decoder"|None (auto).

    dtype ("float32"|"bfloat16", BERT only; None -> $KD_EMBED_DTYPE, else bfloat16 where the CPU has bf16 units, else
    float32); quantize (None|"int8"|"int4", decoders only).
    """
    p = Path(path) if path is not None else default_encoder_path()
    if not p.exists():
        raise FileNotFoundError(f"embedding model path {p} does not exist")
    kind = kind or _detect_kind(p)
    if kind == "bert":
        if quantize is not None:
            raise ValueError("quantize= applies to decoder embedders; use dtype='bfloat16' for a faster BERT")
        return load_bert_embedder(p, dtype=dtype)
    if kind == "decoder":
        return load_decoder_embedder(p, quantize=quantize)
    raise ValueError(f"kind must be 'bert', 'decoder' or None, got {kind!r}")
