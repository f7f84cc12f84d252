"""Reciprocal rank fusion of ranked hit lists."""
from __future__ import annotations

from collections.abc import Sequence


def rrf(
    rankings: Sequence[Sequence[tuple[int, float]]], *, k: int = 60, weights: Sequence[float] | None = None
) -> list[tuple[int, float]]:
    """Fuse ranked ``(id, score)`` lists: score(id) = sum_i w_i / (k + rank_i), ranks from 1; best first.

    Only ranks matter, never the input scores. Ties keep the order in which ids were first seen.
    """
    if k <= 0:
        raise ValueError(f"rrf k must be positive, got {k}")
    if weights is None:
        weights = [1.0] * len(rankings)
    if len(weights) != len(rankings):
        raise ValueError(f"rrf got {len(rankings)} rankings but {len(weights)} weights")
    fused: dict[int, float] = {}
    for hits, w in zip(rankings, weights):
        seen: set[int] = set()
        rank = 0
        for doc_id, _score in hits:
            doc_id = int(doc_id)
            if doc_id in seen:  # a duplicate id in one list counts once, at its best rank
                continue
            seen.add(doc_id)
            rank += 1
            fused[doc_id] = fused.get(doc_id, 0.0) + float(w) / (k + rank)
    order = sorted(enumerate(fused.items()), key=lambda t: (-t[1][1], t[0]))
    return [(doc_id, score) for _, (doc_id, score) in order]
