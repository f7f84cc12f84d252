"""Citation markers: keep only [n] that point to a source retrieved for this answer."""
from __future__ import annotations

import re

_MARKER = re.compile(r"\[(\s*\d+\s*(?:[,;]\s*\d+\s*)*)\]")
_OPEN_TAIL = re.compile(r"\[[\d,;\s]*$")


def _rewrite(match: re.Match, valid: set[int]) -> str:
    kept = [int(n) for n in re.split(r"[,;]", match.group(1)) if n.strip() and int(n) in valid]
    return "".join(f"[{n}]" for n in dict.fromkeys(kept))


def clean_markers(text: str, *, valid: set[int]) -> str:
    """Drop every marker (or marker number) that is not in valid; [1, 9] -> [1] when only 1 is valid."""
    return _MARKER.sub(lambda m: _rewrite(m, valid), text)


def cited_numbers(text: str) -> list[int]:
    """The marker numbers in order of first appearance."""
    seen: dict[int, None] = {}
    for m in _MARKER.finditer(text):
        for n in re.split(r"[,;]", m.group(1)):
            if n.strip():
                seen[int(n)] = None
    return list(seen)


class MarkerStream:
    """Filters streamed pieces: text is released as soon as it cannot be part of an unfinished marker."""

    def __init__(self, *, valid: set[int]) -> None:
        self.valid = valid
        self.pending = ""

    def feed(self, piece: str) -> str:
        self.pending += piece
        tail = _OPEN_TAIL.search(self.pending)
        if tail and len(self.pending) - tail.start() <= 12:
            ready, self.pending = self.pending[: tail.start()], self.pending[tail.start() :]
        else:
            ready, self.pending = self.pending, ""
        return clean_markers(ready, valid=self.valid)

    def flush(self) -> str:
        rest, self.pending = self.pending, ""
        return clean_markers(rest, valid=self.valid) if _MARKER.search(rest) else re.sub(r"\[[\d,;\s]*$", "", rest)
