"""AutoTokenizer: a Hugging Face `tokenizer.json` run by the `tokenizers` library, plus the folder's jinja chat template."""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from tokenizers import Tokenizer

from modelcore.errors import ModelNotFoundError, TokenizerError

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_str(value: Any) -> str | None:
    """Special tokens are stored as plain strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class BatchEncoding(dict):
    """Dict of input_ids / attention_mask that also allows attribute access (like transformers')."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


class AutoTokenizer:
    """Encode/decode with a `tokenizers.Tokenizer`; render chat templates with jinja2."""

    def __init__(self, tokenizer: Tokenizer, config: dict[str, Any] | None = None, chat_template: str | None = None):
        self.backend = tokenizer
        self.config = dict(config or {})
        self.chat_template = chat_template or self.config.get("chat_template")
        for key in SPECIAL_KEYS:
            setattr(self, key, _token_str(self.config.get(key)))
        self.padding_side: str = self.config.get("padding_side", "right")
        self.model_max_length: int | None = self.config.get("model_max_length")
        if self.pad_token is None:
            self.pad_token = self.eos_token

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, **_: Any) -> "AutoTokenizer":
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a folder, or from a .gguf file."""
        p = Path(path)
        if not p.exists():
            raise ModelNotFoundError(f"tokenizer path {p} does not exist")
        if p.is_file() and p.suffix == ".gguf":
            from modelcore.gguf import open_gguf  # MC-B's modules
            from modelcore.gguf_tokenizer import tokenizer_from_gguf

            return tokenizer_from_gguf(open_gguf(p))
        tj = p / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{p}: no tokenizer.json (modelcore reads the fast-tokenizer format only)")
        try:
            backend = Tokenizer.from_file(str(tj))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise TokenizerError(f"{tj}: cannot be read by `tokenizers`: {exc}") from exc
        config: dict[str, Any] = {}
        if (p / "tokenizer_config.json").is_file():
            config = json.loads((p / "tokenizer_config.json").read_text(encoding="utf-8"))
        template = None
        if (p / "chat_template.jinja").is_file():
            template = (p / "chat_template.jinja").read_text(encoding="utf-8")
        elif (p / "chat_template.json").is_file():
            template = json.loads((p / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
        return cls(backend, config, template)

    def save_pretrained(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja."""
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(p / "tokenizer.json"))
        config = {k: v for k, v in self.config.items() if k != "chat_template"}
        for key in SPECIAL_KEYS:
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        (p / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        if self.chat_template:
            (p / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")

    # ---- ids -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def pad_token_id(self) -> int | None:
        pid = self.token_to_id(self.pad_token)
        return pid if pid is not None else self.eos_token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of one string."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode() needs a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], return_tensors: str | None = None, padding: bool | str = True,
                 add_special_tokens: bool = True, padding_side: str | None = None) -> BatchEncoding:
        """Encode one string or a batch; pads batches with pad_token on `padding_side`; 'pt' returns tensors."""
        single = isinstance(text, str)
        if not single and not isinstance(text, (list, tuple)):
            raise TokenizerError(f"the tokenizer takes a str or a list of str, got {type(text).__name__}")
        texts = [text] if single else list(text)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise TokenizerError("the tokenizer takes a str or a list of str")
        ids = [self.encode(t, add_special_tokens=add_special_tokens) for t in texts]
        side = padding_side or self.padding_side
        if return_tensors == "pt" or (padding and not single):
            ids, mask = self.pad(ids, side=side)
        else:
            mask = [[1] * len(x) for x in ids]
        if return_tensors == "pt":
            return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long).reshape(len(ids), -1),
                                 attention_mask=torch.tensor(mask, dtype=torch.long).reshape(len(ids), -1))
        if return_tensors is not None:
            raise TokenizerError(f"return_tensors={return_tensors!r} not supported (use 'pt' or None)")
        return BatchEncoding(input_ids=ids[0] if single else ids, attention_mask=mask[0] if single else mask)

    def pad(self, ids: list[list[int]], side: str = "right") -> tuple[list[list[int]], list[list[int]]]:
        """Pad to the longest row; returns (ids, attention_mask)."""
        if side not in ("left", "right"):
            raise TokenizerError(f"padding_side must be 'left' or 'right', not {side!r}")
        longest = max((len(x) for x in ids), default=0)
        pad_id = self.pad_token_id if self.pad_token_id is not None else 0
        out, mask = [], []
        for x in ids:
            n = longest - len(x)
            out.append(x + [pad_id] * n if side == "right" else [pad_id] * n + x)
            mask.append([1] * len(x) + [0] * n if side == "right" else [0] * n + [1] * len(x))
        return out, mask

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """Text of a sequence of ids (a 1-D tensor or list)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def batch_decode(self, rows: Iterable[Iterable[int]] | torch.Tensor, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(r, skip_special_tokens=skip_special_tokens) for r in rows]

    # ---- chat ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, **extra: Any) -> str | list[int] | torch.Tensor:
        """Render the checkpoint's own jinja chat template; tokenize=True returns ids (a (1,T) tensor with 'pt')."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat_template (tokenizer_config.json / chat_template.jinja)")
        if not isinstance(messages, list) or any(not isinstance(m, dict) or "role" not in m for m in messages):
            raise TokenizerError("messages must be a list of {'role': ..., 'content': ...} dicts")
        text = render_chat_template(
            self.chat_template, messages=messages, add_generation_prompt=add_generation_prompt,
            **{k: getattr(self, k) for k in SPECIAL_KEYS}, **extra)
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return torch.tensor([ids], dtype=torch.long) if return_tensors == "pt" else ids


def render_chat_template(template: str, **variables: Any) -> str:
    """Render a HF chat template in a sandboxed jinja2 environment with HF's helpers (raise_exception, tojson, strftime_now)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TokenizerError(f"chat template error: {message}")

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(**variables)
    except TemplateError as exc:
        raise TokenizerError(f"chat template failed to render: {exc}") from exc


class IncrementalDecoder:
    """Turn a growing list of ids into text pieces, holding back bytes of a multi-byte character until it is complete."""

    def __init__(self, tokenizer: AutoTokenizer, skip_special_tokens: bool = True):
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids before this are fully emitted and only kept as left context
        self.read = 0  # ids before this have produced the text already emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text (possibly '')."""
        self.ids.append(int(token_id))
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is left (an incomplete character at the very end is emitted as decoded)."""
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=self.skip)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]
