"""Chunk cleaned elements by section to a token budget, with overlap; tables kept whole or split by rows."""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from html.parser import HTMLParser

from ingestion.elements import Chunk, Element

_STOP_ZH = "。！？；"
_STOP_EN = ".!?"
_CLOSERS = "。！？；.!?”’」』）)\"'"
_CLAUSE = "，、：,:;"


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


_SENTENCE_END = re.compile(r"[。！？；]|[.!?](?=\s|\Z)")
_CJK_RE = re.compile("[\u3000-\u9fff\uff00-\uffef]")


def split_sentences(text: str) -> list[str]:
    """Split after 。！？； anywhere and after .!? followed by whitespace; never inside a character."""
    out: list[str] = []
    start, n = 0, len(text)
    for m in _SENTENCE_END.finditer(text):
        if m.start() < start:  # inside closers already taken by the previous sentence
            continue
        j = m.end()
        while j < n and text[j] in _CLOSERS:
            j += 1
        out.append(text[start:j])
        start = j
    if start < n:
        out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _pieces(text: str) -> tuple[list[str], bool]:
    """Smaller pieces of an over-long sentence: clauses, else words, else characters.

    The flag says the cuts fall on pre-token boundaries (after punctuation or a space), not inside a word.
    """
    parts: list[str] = []
    buf = ""
    for ch in text:
        buf += ch
        if ch in _CLAUSE:
            parts.append(buf)
            buf = ""
    if buf:
        parts.append(buf)
    if len(parts) > 1:
        return parts, True
    words = text.split(" ")
    if len(words) > 1:
        return [w + " " for w in words[:-1]] + [words[-1]], True
    return list(text), False


def _join(a: str, b: str) -> str:
    if not a:
        return b
    if _is_cjk(a[-1]) or _is_cjk(b[:1] or " "):
        return a + b
    return a + ("" if a.endswith(" ") else " ") + b


def _fit(text: str, *, counts: "_Counts", max_tokens: int) -> list[str]:
    """Split `text` into pieces that each fit the budget, preferring clause and word boundaries.

    Where the tokenizer is additive and the cuts fall on boundaries, the pieces are counted from the text's
    one encoding and a run of pieces by summing them (no re-tokenising of each longer candidate).
    """
    if counts(text) <= max_tokens:
        return [text]
    pieces, aligned = _pieces(text)
    if len(pieces) == 1:  # a single character over budget cannot be split further
        return pieces
    summed = aligned and counts.spans(text, pieces)
    special = counts.special
    out: list[tuple[str, int]] = []
    cur, cur_n = "", 0
    for piece in pieces:
        cand = cur + piece
        if not cur:
            cur, cur_n = cand, counts(cand)
            continue
        n = cur_n + counts(piece) - special if summed else counts(cand)
        if n > max_tokens:
            out.append((cur, cur_n))
            cur, cur_n = piece, counts(piece)
        else:
            cur, cur_n = cand, n
    if cur:
        out.append((cur, cur_n))
    result: list[str] = []
    for part, n in out:
        if n > max_tokens:
            result.extend(_fit(part, counts=counts, max_tokens=max_tokens))
            continue
        stripped = part.strip()
        if summed and stripped:
            counts.remember(stripped, n)  # whitespace carries no tokens in an additive tokenizer
        result.append(part)
    return [p.strip() for p in result if p.strip()]


class _TableRows(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def table_rows(element: Element) -> list[str]:
    """Rows of a table as text lines ("a | b | c"), from its HTML where present."""
    if element.html:
        parser = _TableRows()
        parser.feed(element.html)
        rows = [" | ".join(c for c in row) for row in parser.rows if any(c for c in row)]
        if rows:
            return rows
    return [ln for ln in element.text.split("\n") if ln.strip()]


@dataclass(slots=True)
class _Unit:
    text: str
    type: str
    page: int
    tokens: int
    new_element: bool  # starts a new element (joined with a newline)
    carry: bool  # may be repeated as overlap
    path: tuple[str, ...] = ()  # heading path of the section the unit belongs to
    whole: bool = False  # a whole multi-sentence element, split into sentences only when needed


class _Counts:
    """Token counts with each text tokenised at most once (a memo over ``count_tokens``).

    Given ``token_starts`` (start offsets of the tokens ``count_tokens`` counts, specials excluded) and a
    tokenizer that passes the additivity probe, the sentences and table rows of an element are counted from
    the element's one encoding: a span that begins and ends on pre-token boundaries (whitespace, punctuation)
    holds exactly the tokens that start inside it, so splitting an element costs no second tokenisation.
    """

    def __init__(self, count_tokens: Callable[[str], int], token_starts: Callable[[str], Sequence[int]] | None = None):
        self._count = count_tokens
        self._memo: dict[str, int] = {}
        self._starts: dict[str, Sequence[int]] = {}
        self.special, self.additive, agree = _probe(count_tokens, token_starts)
        self._starts_of = token_starts if agree else None

    def __call__(self, text: str) -> int:
        n = self._memo.get(text)
        if n is None:
            if self._starts_of is not None:
                starts = self._starts[text] = self._starts_of(text)
                n = len(starts) + self.special
            else:
                n = self._count(text)
            self._memo[text] = n
        return n

    def remember(self, text: str, n: int) -> None:
        """Record a count known otherwise (a sum of additive parts)."""
        self._memo.setdefault(text, n)

    def spans(self, text: str, parts: Sequence[str]) -> bool:
        """Count ``parts``, consecutive pieces of ``text`` cut at pre-token boundaries, from text's one encoding.

        Returns False (nothing recorded for the rest) where that cannot be done: no offsets, or not pieces of text.
        """
        if self._starts_of is None:
            return False
        starts = self._starts.get(text)
        if starts is None:
            starts = self._starts[text] = self._starts_of(text)
            self._memo.setdefault(text, len(starts) + self.special)
        pos = 0
        for part in parts:
            i = text.find(part, pos)
            if i < 0:  # not a piece of text after all: leave it to count_tokens
                return False
            pos = i + len(part)
            if part not in self._memo:
                self._memo[part] = bisect_left(starts, pos) - bisect_left(starts, i) + self.special
        return True


def _table_units(el: Element, *, counts: _Counts, max_tokens: int) -> list[_Unit]:
    rows = table_rows(el)
    whole = "\n".join(rows)
    n = counts(whole)
    if n <= max_tokens or len(rows) < 2:
        return [_Unit(whole, "Table", el.page, n, True, False)]
    counts.spans(whole, rows)
    header, body = rows[0], rows[1:]
    special = counts.special
    parts: list[tuple[str, int]] = []  # (text, tokens when the tokenizer is additive)
    cur: list[str] = []
    header_tokens = counts(header)
    used = header_tokens
    for row in body:
        row_tokens = counts(row) - special
        if cur and used + row_tokens > max_tokens:
            parts.append(("\n".join([header, *cur]), used))
            cur, used = [], header_tokens
        cur.append(row)
        used += row_tokens
    if cur:
        parts.append(("\n".join([header, *cur]), used))
    units: list[_Unit] = []
    for part, tokens in parts:
        if counts.additive and tokens <= max_tokens:  # summed row counts are exact: no second pass
            units.append(_Unit(part, "Table", el.page, tokens, True, False))
            continue
        for piece in _fit(part, counts=counts, max_tokens=max_tokens):
            units.append(_Unit(piece, "Table", el.page, counts(piece), True, False))
    return units


def _sentence_units(text: str, *, kind: str, page: int, counts: _Counts, max_tokens: int) -> list[_Unit]:
    sentences = split_sentences(text)
    counts.spans(text, sentences)
    units: list[_Unit] = []
    for sentence in sentences:
        for piece in _fit(sentence, counts=counts, max_tokens=max_tokens):
            units.append(_Unit(piece, kind, page, counts(piece), not units, kind != "Title"))
    return units


def _units(el: Element, *, counts: _Counts, max_tokens: int) -> list[_Unit]:
    """One unit per element where it fits (counted once); sentences only for elements over the budget."""
    if el.type == "Table":
        return _table_units(el, counts=counts, max_tokens=max_tokens)
    text = el.text.strip() if _CJK_RE.search(el.text, 0, 50) else " ".join(el.text.split())
    n = counts(text)
    if n <= max_tokens and el.type != "Title":
        return [_Unit(text, el.type, el.page, n, True, True, whole=True)]
    return _sentence_units(text, kind=el.type, page=el.page, counts=counts, max_tokens=max_tokens)


_PROBES = (("Net sales rose 4%.", "Costs fell."), ("Revenue", "grew in Q2"), ("营业收入增长。", "净利润下降。"),
           ("Total 1,200", "Cash $ 28,408"), ("co-operation", "re-invest"))


def is_additive(count_tokens: Callable[[str], int]) -> bool:
    """True when count(a + sep + b) == count(a) + count(b) - specials for our joins (WordPiece-like tokenizers).

    Then a chunk's token count is the sum of its units' counts and need not be re-tokenised; byte-level BPE
    and SentencePiece tokenizers fail the probe (they tokenise the separator) and get exact counts.
    """
    special = count_tokens("")
    for a, b in _PROBES:
        for joined in (a + "\n" + b, _join(a, b)):
            if count_tokens(joined) != count_tokens(a) + count_tokens(b) - special:
                return False
    return True


@lru_cache(maxsize=16)
def _probe(count_tokens: Callable[[str], int], token_starts: Callable[[str], Sequence[int]] | None) -> tuple[int, bool, bool]:
    """(special tokens per text, additive?, token_starts agrees with count_tokens?), once per tokenizer."""
    special = count_tokens("")
    additive = is_additive(count_tokens)
    agree = token_starts is not None and additive and all(
        count_tokens(t) == len(token_starts(t)) + special for pair in _PROBES for t in pair)
    return special, additive, agree


class _Packer:
    """Accumulates units of one section and emits chunks within the budget."""

    def __init__(self, *, counts: _Counts, max_tokens: int, overlap_tokens: int) -> None:
        self.count_tokens = counts
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.chunks: list[Chunk] = []
        self.buf: list[_Unit] = []
        self.n_carried = 0  # leading units of buf that repeat the previous chunk
        self.special = counts.special
        self.additive = counts.additive

    def _text(self, units: list[_Unit]) -> str:
        text = ""
        for u in units:
            text = (text + "\n" + u.text) if (text and u.new_element) else _join(text, u.text)
        return text

    def _over(self, unit: _Unit) -> bool:
        """Would buf + unit pass the budget? Each unit's count includes the per-text special tokens once."""
        return sum(u.tokens - self.special for u in self.buf) + unit.tokens > self.max_tokens

    def _split(self, unit: _Unit) -> list[_Unit]:
        """The sentences of a whole-element unit, carrying its page and heading path."""
        parts = _sentence_units(unit.text, kind=unit.type, page=unit.page, counts=self.count_tokens,
                                max_tokens=self.max_tokens)
        for p in parts:
            p.path = unit.path
        if parts:
            parts[0].new_element = unit.new_element
        return parts

    def add(self, unit: _Unit) -> None:
        if self.buf and self._over(unit) and unit.whole:
            parts = self._split(unit)  # fill the current chunk sentence by sentence
            if len(parts) > 1:
                for part in parts:
                    self.add(part)
                return
        if self.buf and self._over(unit):
            if len(self.buf) > self.n_carried:
                self.emit(keep_overlap=True)
            if self.buf and self._over(unit):
                self.buf, self.n_carried = [], 0  # overlap does not fit beside this unit
        self.buf.append(unit)

    def own_tokens(self) -> int:
        """Tokens of the units not repeated from the previous chunk."""
        return sum(u.tokens - self.special for u in self.buf[self.n_carried:])

    def emit(self, *, keep_overlap: bool) -> None:
        if len(self.buf) > self.n_carried:
            units = self.buf
            text = self._text(units)
            if self.additive:
                tokens = sum(u.tokens - self.special for u in units) + self.special
            else:
                tokens = self.count_tokens(text)
            while tokens > self.max_tokens and len(units) > 1:  # joined text tokenised longer than its parts
                units = units[:-1]
                text = self._text(units)
                tokens = self.count_tokens(text)
            rest = self.buf[len(units):]
            types = list(dict.fromkeys(u.type for u in units))
            pages = [u.page for u in units]
            mine = units[self.n_carried:] or units
            own = next((u for u in mine if u.type != "Title"), mine[0])  # leading titles head what follows
            self.chunks.append(Chunk(text=text, page_start=min(pages), page_end=max(pages),
                                     heading_path=list(own.path), element_types=types, token_count=tokens))
            if rest:
                self.buf, self.n_carried = [], 0
                for u in rest:
                    self.add(u)
                return
        carried: list[_Unit] = []
        if keep_overlap and self.overlap_tokens > 0:
            total = 0
            for u in reversed(self.buf):
                if not u.carry:
                    break
                if total + u.tokens > self.overlap_tokens:
                    if u.whole:  # repeat the paragraph's last sentences, not all of it
                        for part in reversed(self._split(u)):
                            if total + part.tokens > self.overlap_tokens:
                                break
                            carried.insert(0, part)
                            total += part.tokens
                    break
                carried.insert(0, u)
                total += u.tokens
        if carried:
            c0 = carried[0]
            carried[0] = _Unit(c0.text, c0.type, c0.page, c0.tokens, True, True, c0.path, c0.whole)
        self.buf, self.n_carried = carried, len(carried)


def chunk_elements(
    elements: Iterable[Element],
    *,
    count_tokens: Callable[[str], int],
    max_tokens: int = 256,
    overlap_tokens: int = 32,
    token_starts: Callable[[str], Sequence[int]] | None = None,
) -> list[Chunk]:
    """Group elements into chunks per section; every chunk has <= max_tokens tokens by `count_tokens`.

    ``token_starts`` (optional, the same tokenizer's token start offsets) lets an element be tokenised once
    even when it is split into sentences or rows; see ``_Counts``.
    """
    if max_tokens <= 0 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError("need max_tokens > 0 and 0 <= overlap_tokens < max_tokens")
    combine_under = max_tokens // 4  # a section this small shares a chunk with the next one
    counts = _Counts(count_tokens, token_starts)
    packer = _Packer(counts=counts, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
    stack: list[tuple[int, str]] = []
    for el in elements:
        if el.type == "Title":
            if packer.own_tokens() >= combine_under:
                packer.emit(keep_overlap=False)
            level = el.level if el.level is not None else (stack[-1][0] if stack else 0)
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, " ".join(el.text.split())[:200]))
        path = tuple(t for _, t in stack)
        for unit in _units(el, counts=counts, max_tokens=max_tokens):
            unit.path = path
            packer.add(unit)
    packer.emit(keep_overlap=False)
    return packer.chunks
