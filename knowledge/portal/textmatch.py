"""Small lexical helpers: content terms, sentence splitting and support scores (English and Chinese)."""
from __future__ import annotations

import re

_STOP = set(
    """a an and are as at be been by can could did do does for from had has have how i if in into is it its
    of on or our so that the their them then there these they this those to was were what when where which
    who whom why will with would you your about tell me please give show much many did does company
    compared versus vs than also any all per""".split()
)
_WORD = re.compile(r"[A-Za-z][A-Za-z0-9.&'’-]*|\d[\d,]*(?:\.\d+)?%?|[\u4e00-\u9fff]+")
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
_SENT = re.compile(r"(?<=[.!?。！？;；])\s+|\n{1,}")


def terms(text: str) -> set[str]:
    """Content terms: lower-cased words without stop words, numbers, and Chinese character bigrams."""
    out: set[str] = set()
    for tok in _WORD.findall(text or ""):
        if "\u4e00" <= tok[0] <= "\u9fff":
            out.update(tok[i : i + 2] for i in range(max(1, len(tok) - 1)))
            continue
        tok = tok.lower().strip(".'-")
        if tok.endswith("'s") or tok.endswith("’s"):
            tok = tok[:-2]
        if tok and tok not in _STOP and len(tok) > 1:
            out.add(tok.replace(",", ""))
    return out


def numbers(text: str) -> set[str]:
    """Numbers as written, without thousands separators and trailing zeros after a point."""
    found = set()
    for n in _NUMBER.findall(text or ""):
        n = n.replace(",", "")
        if "." in n:
            n = n.rstrip("0").rstrip(".")
        found.add(n)
    return found


def coverage(query: str, text: str) -> float:
    """Share of the query's content terms that occur in text (0..1)."""
    q = terms(query)
    if not q:
        return 0.0
    t = terms(text)
    return len(q & t) / len(q)


def sentences(text: str) -> list[str]:
    """Split text into sentences or lines, dropping very short fragments."""
    return [s.strip() for s in _SENT.split(text or "") if len(s.strip()) >= 12]
