"""Chunk cleaned elements by section to a token budget, with overlap; tables kept whole or split by rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


def split_sentences(text: str) -> list[str]:
    """Split after 。！？； anywhere and after .!? followed by whitespace; never inside a character."""
    out: list[str] = []
    start = i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch in _STOP_ZH or (ch in _STOP_EN and (i + 1 == n or text[i + 1].isspace())):
            j = i + 1
            while j < n and text[j] in _CLOSERS:
                j += 1
            out.append(text[start:j])
            start = i = j
            continue
        i += 1
    if start < n:
        out.append(text[start:])
    return [s.strip() for s in out if s.strip()]


def _pieces(text: str) -> list[str]:
    """Smaller pieces of an over-long sentence: clauses, else words, else characters."""
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
        return parts
    words = text.split(" ")
    if len(words) > 1:
        return [w + " " for w in words[:-1]] + [words[-1]]
    return list(text)


def _join(a: str, b: str) -> str:
    if not a:
        return b
    if _is_cjk(a[-1]) or _is_cjk(b[:1] or " "):
        return a + b
    return a + ("" if a.endswith(" ") else " ") + b


def _fit(text: str, *, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """Split `text` into pieces that each fit the budget, preferring clause and word boundaries."""
    if count_tokens(text) <= max_tokens:
        return [text]
    pieces = _pieces(text)
    if len(pieces) == 1:  # a single character over budget cannot be split further
        return pieces
    out: list[str] = []
    cur = ""
    for piece in pieces:
        cand = cur + piece
        if cur and count_tokens(cand) > max_tokens:
            out.append(cur)
            cur = piece
        else:
            cur = cand
    if cur:
        out.append(cur)
    result: list[str] = []
    for part in out:
        result.extend(_fit(part, count_tokens=count_tokens, max_tokens=max_tokens) if count_tokens(part) > max_tokens else [part])
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


def _table_units(el: Element, *, count_tokens: Callable[[str], int], max_tokens: int, additive: bool = False) -> list[_Unit]:
    rows = table_rows(el)
    whole = "\n".join(rows)
    n = count_tokens(whole)
    if n <= max_tokens or len(rows) < 2:
        return [_Unit(whole, "Table", el.page, n, True, False)]
    header, body = rows[0], rows[1:]
    special = count_tokens("")  # [CLS]/[SEP]-style tokens counted once per text
    parts: list[tuple[str, int]] = []  # (text, tokens when the tokenizer is additive)
    cur: list[str] = []
    header_tokens = count_tokens(header)
    used = header_tokens
    for row in body:
        row_tokens = count_tokens(row) - special
        if cur and used + row_tokens > max_tokens:
            parts.append(("\n".join([header, *cur]), used))
            cur, used = [], header_tokens
        cur.append(row)
        used += row_tokens
    if cur:
        parts.append(("\n".join([header, *cur]), used))
    units: list[_Unit] = []
    for part, tokens in parts:
        if additive and tokens <= max_tokens:  # summed row counts are exact: no second pass
            units.append(_Unit(part, "Table", el.page, tokens, True, False))
            continue
        for piece in _fit(part, count_tokens=count_tokens, max_tokens=max_tokens):
            units.append(_Unit(piece, "Table", el.page, count_tokens(piece), True, False))
    return units


def _sentence_units(text: str, *, kind: str, page: int, count_tokens: Callable[[str], int], max_tokens: int) -> list[_Unit]:
    units: list[_Unit] = []
    for sentence in split_sentences(text):
        for piece in _fit(sentence, count_tokens=count_tokens, max_tokens=max_tokens):
            units.append(_Unit(piece, kind, page, count_tokens(piece), not units, kind != "Title"))
    return units


def _units(el: Element, *, count_tokens: Callable[[str], int], max_tokens: int, additive: bool = False) -> list[_Unit]:
    """One unit per element where it fits (counted once); sentences only for elements over the budget."""
    if el.type == "Table":
        return _table_units(el, count_tokens=count_tokens, max_tokens=max_tokens, additive=additive)
    text = " ".join(el.text.split()) if not any(_is_cjk(ch) for ch in el.text[:50]) else el.text.strip()
    n = count_tokens(text)
    if n <= max_tokens and el.type != "Title":
        return [_Unit(text, el.type, el.page, n, True, True, whole=True)]
    return _sentence_units(el.text, kind=el.type, page=el.page, count_tokens=count_tokens, max_tokens=max_tokens)


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


class _Packer:
    """Accumulates units of one section and emits chunks within the budget."""

    def __init__(self, *, count_tokens: Callable[[str], int], max_tokens: int, overlap_tokens: int) -> None:
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens
        self.overlap_tokens = overlap_tokens
        self.chunks: list[Chunk] = []
        self.buf: list[_Unit] = []
        self.n_carried = 0  # leading units of buf that repeat the previous chunk
        self.special = count_tokens("")
        self.additive = is_additive(count_tokens)

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
        parts = _sentence_units(unit.text, kind=unit.type, page=unit.page, count_tokens=self.count_tokens,
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
) -> list[Chunk]:
    """Group elements into chunks per section; every chunk has <= max_tokens tokens by `count_tokens`."""
    if max_tokens <= 0 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError("need max_tokens > 0 and 0 <= overlap_tokens < max_tokens")
    combine_under = max_tokens // 4  # a section this small shares a chunk with the next one
    count_tokens = lru_cache(maxsize=8192)(count_tokens)  # sentences are counted when fitted and when packed
    packer = _Packer(count_tokens=count_tokens, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
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
        for unit in _units(el, count_tokens=count_tokens, max_tokens=max_tokens, additive=packer.additive):
            unit.path = path
            packer.add(unit)
    packer.emit(keep_overlap=False)
    return packer.chunks
