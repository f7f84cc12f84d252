"""Clean partitioned elements: running headers/footers, boilerplate, hyphenation, width, duplicates."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable

from ingestion.elements import Element

DROP_TYPES = frozenset({"Header", "Footer", "PageNumber", "PageBreak", "Image"})
_DEDUP_TYPES = frozenset({"NarrativeText", "ListItem", "UncategorizedText", "Table"})
_EDGE = 2  # elements at each end of a page that may be running headers/footers
_MIN_PAGES_FOR_RUNNING = 3

# Chinese/Japanese punctuation kept full-width (NFKC would turn ，。！？ into ASCII look-alikes).
_KEEP_WIDE = frozenset("，。！？；：、（）【】《》〈〉「」『』〔〕…—·～“”‘’")
_CJK = r"\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef"
_HYPHEN_LOWER = re.compile(r"(\w)[-\u00ad\x02]\n(?=[a-z])")
_HYPHEN_BREAK = re.compile(r"(\w+)-\n([a-z]\w*)")
_BROKEN_WORD = re.compile(r"\w+[-\u00ad\x02]\n[a-z]\w*")
_WORDS = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")
_HYPHEN_OTHER = re.compile(r"(\w)-\n(?=\w)")
_SOFT_HYPHEN = re.compile(r"[\u00ad\x02]")
_NEWLINE_CJK = re.compile(rf"(?<=[{_CJK}])\s*\n\s*(?=[{_CJK}])")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200b\u202f\u205f]+")
_NEWLINES = re.compile(r"\s*\n\s*")
_DIGITS = re.compile(r"\d+")
_PAGE_NO = re.compile(r"^\s*(page\s+)?[-\u2013(]?\s*\d{1,4}\s*[-\u2013)]?(\s*(of|/)\s*\d+)?\s*$", re.I)


def normalize_width(text: str) -> str:
    """NFKC for full-width ASCII forms, ligatures and odd spaces; keep CJK punctuation."""
    if text.isascii():
        return text
    return "".join(ch if ch.isascii() or ch in _KEEP_WIDE else unicodedata.normalize("NFKC", ch) for ch in text)


def paragraph_fingerprint(text: str) -> str:
    """Stable id of a paragraph's wording: case, width, digits-as-is and spacing ignored."""
    norm = _SPACES.sub(" ", normalize_width(text).replace("\n", " ")).strip().lower()
    return hashlib.sha1(norm.encode("utf-8")).hexdigest()[:16]


def _running_key(text: str) -> str:
    """Key for header/footer detection: page numbers and dates vary, so digits are masked."""
    return _DIGITS.sub("#", _SPACES.sub(" ", text.replace("\n", " ")).strip().lower())


def document_vocabulary(texts: Iterable[str]) -> frozenset[str]:
    """Lower-cased words and hyphenated compounds a document uses away from line ends (for line-end hyphens)."""
    vocab: set[str] = set()
    for text in texts:
        for word in _WORDS.findall(_BROKEN_WORD.sub(" ", text)):
            word = word.lower()
            vocab.add(word)
            if "-" in word:
                vocab.update(word.split("-"))
    return frozenset(vocab)


def _line_end_hyphen(vocab: frozenset[str]):
    """Rejoin `left-\nright`: as one word when the document writes it so (or does not know the parts), hyphenated
    when the document writes the compound, or both parts as words of their own and never the joined word."""

    def join(m: re.Match) -> str:
        left, right = m.group(1), m.group(2)
        lo, ro = left.lower(), right.lower()
        if (lo + ro) in vocab:
            return left + right
        if f"{lo}-{ro}" in vocab or (len(lo) > 1 and len(ro) > 1 and lo in vocab and ro in vocab):
            return f"{left}-{right}"
        return left + right

    return join


def clean_text(text: str, *, keep_lines: bool = False, vocab: frozenset[str] | None = None) -> str:
    """Fix line-end hyphenation, normalise width and whitespace; tables keep their line breaks.

    vocab: the document's words (``document_vocabulary``); with it a line-end hyphen of a compound the document
    uses ("long-\nterm") is kept, without it every lower-case continuation is joined ("manu-\nfacturing").
    """
    text = normalize_width(text).replace("\r\n", "\n").replace("\r", "\n")
    if vocab:
        text = _HYPHEN_BREAK.sub(_line_end_hyphen(vocab), text)
    text = _HYPHEN_LOWER.sub(r"\1", text)
    text = _HYPHEN_OTHER.sub(r"\1-", text)
    text = _SOFT_HYPHEN.sub("", text)
    text = _NEWLINE_CJK.sub("", text)
    if keep_lines:
        lines = (_SPACES.sub(" ", ln).strip() for ln in text.split("\n"))
        return "\n".join(ln for ln in lines if ln)
    return _SPACES.sub(" ", _NEWLINES.sub(" ", text)).strip()


def _running_indexes(elements: list[Element]) -> set[int]:
    """Indexes of elements at page edges whose (digit-masked) text recurs on many pages."""
    by_page: dict[int, list[int]] = defaultdict(list)
    for i, el in enumerate(elements):
        by_page[el.page].append(i)
    if len(by_page) < _MIN_PAGES_FOR_RUNNING:
        return set()
    pages_with: dict[str, set[int]] = defaultdict(set)
    candidates: dict[str, list[int]] = defaultdict(list)
    for page, idxs in by_page.items():
        for i in set(idxs[:_EDGE] + idxs[-_EDGE:]):
            el = elements[i]
            if el.type == "Table" or len(el.text) > 200:
                continue
            key = _running_key(el.text)
            pages_with[key].add(page)
            candidates[key].append(i)
    threshold = max(_MIN_PAGES_FOR_RUNNING, int(0.3 * len(by_page)))
    return {i for key, pages in pages_with.items() if len(pages) >= threshold for i in candidates[key]}


_SENTENCE_END = tuple(".!?。！？；:：\"”’)）")


def _continues(prev: Element, el: Element) -> bool:
    """A paragraph cut by a page break: same text type, next page, no sentence end, lower-case/CJK start."""
    if prev.type != el.type or el.type not in ("NarrativeText", "UncategorizedText") or el.page != prev.page + 1:
        return False
    if prev.text.rstrip().endswith(_SENTENCE_END):
        return False
    first = el.text.lstrip()[:1]
    return bool(first) and (first.islower() or "\u3400" <= first <= "\u9fff")


def clean_elements(elements: Iterable[Element], *, boilerplate: set[str] | frozenset[str] = frozenset()) -> list[Element]:
    """Return cleaned copies; drops headers/footers, page numbers, boilerplate, empty and duplicate paragraphs."""
    items = [el for el in elements if el.type not in DROP_TYPES and el.text.strip()]
    running = _running_indexes(items)
    vocab = document_vocabulary(normalize_width(el.text).replace("\r\n", "\n").replace("\r", "\n") for el in items)
    seen: set[str] = set()
    out: list[Element] = []
    out_src: list[int] = []  # index in `items` of each kept element
    first_page_index: dict[int, int] = {}
    last_page_index: dict[int, int] = {}
    for i, el in enumerate(items):
        if i not in running:
            first_page_index.setdefault(el.page, i)
            last_page_index[el.page] = i
    for i, el in enumerate(items):
        if i in running or (el.type not in ("Table", "Title") and _PAGE_NO.match(el.text)):
            continue
        text = clean_text(el.text, keep_lines=el.type == "Table", vocab=vocab)
        if not text:
            continue
        fp = paragraph_fingerprint(text)
        if fp in boilerplate:
            continue
        if el.type in _DEDUP_TYPES:
            if fp in seen:
                continue
            seen.add(fp)
        prev = out[-1] if out else None
        if prev is not None and last_page_index.get(prev.page) == out_src[-1] and first_page_index.get(el.page) == i and _continues(prev, Element(text=text, type=el.type, page=el.page)):
            joiner = "" if "\u3400" <= text[:1] <= "\u9fff" else " "
            prev.text = prev.text + joiner + text  # keeps the page where the paragraph starts
            continue
        out.append(Element(text=text, type=el.type, page=el.page, level=el.level, html=el.html))
        out_src.append(i)
    return out
