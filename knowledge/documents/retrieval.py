"""Hybrid retrieval, the one entry point for portal and CLI: ``retrieve``.

Dense (FAISS) and BM25 hits, both restricted to chunks of documents the user may see and that
match the filters, fused with reciprocal rank fusion, language-aware: the dense list counts only for
questions in a language the embedder's model card covers (``fusion.hybrid_weights``; the default
all-MiniLM-L6-v2 is English-only, so Chinese questions rank by BM25). When the question names a company, ticker
or fiscal period that documents carry in their metadata, those documents' chunks get a second
pair of ranked lists in the fusion, which lifts them above look-alikes from other companies.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

from knowledge.documents.models import Chunk, Document, Status
from knowledge.documents.selectors import chunk_ids_for_user, document_list_for_user

RRF_K = 60
MAX_K = 100
COMPANY_SUFFIXES = {"inc", "incorporated", "corp", "corporation", "co", "company", "ltd", "limited", "plc", "llc", "the", "group", "holdings", "sa", "ag", "nv"}
PERIOD_RE = re.compile(r"\b(?:(?:fy)?(\d{4})\s*[-_ ]?\s*q([1-4])|q([1-4])\s*[-_ ]?\s*(?:fy)?(\d{4}))\b", re.I)


@dataclass(frozen=True)
class RetrievedChunk:
    chunk_id: int
    score: float
    document_id: int
    title: str
    original_name: str
    page_start: int | None
    page_end: int | None
    heading_path: list[str]
    text: str


@functools.lru_cache(maxsize=4)
def _reader(index_dir: str):
    from ingestion.index import IndexReader

    return IndexReader(Path(index_dir))


def _embedder():
    from knowledge.documents.pipeline import embedder

    return embedder()


def _words(text: str) -> list[str]:
    return re.findall(r"[\w&]+", text.lower())


def _company_key(name: str) -> tuple[str, ...]:
    return tuple(w for w in _words(name) if w not in COMPANY_SUFFIXES)


def _contains(words: list[str], key: tuple[str, ...]) -> bool:
    n = len(key)
    return n > 0 and any(tuple(words[i : i + n]) == key for i in range(len(words) - n + 1))


def _periods(text: str) -> set[tuple[str, str]]:
    return {(m[0] or m[3], m[1] or m[2]) for m in PERIOD_RE.findall(text)}


def named_documents(*, query: str, documents) -> set[int]:
    """Ids of documents whose company, ticker or fiscal period the question names."""
    words = _words(query)
    raw_tokens = set(re.findall(r"\$?[A-Za-z.]+", query))
    asked_periods = _periods(query)
    by_entity: set[int] = set()
    by_period: set[int] = set()
    for doc_id, company, ticker, period in documents.values_list("pk", "company", "ticker", "fiscal_period"):
        if company and _contains(words, _company_key(company)):
            by_entity.add(doc_id)
        if ticker and len(ticker) >= 2:
            t = ticker.upper()
            if t in {tok.lstrip("$") for tok in raw_tokens} or (len(t) >= 3 and t.lower() in words):
                by_entity.add(doc_id)
        if period:
            norm = re.sub(r"[^a-z0-9]", "", period.lower())
            if (_periods(period) & asked_periods) or (len(norm) >= 4 and norm in re.sub(r"[^a-z0-9]", "", query.lower())):
                by_period.add(doc_id)
    if by_entity and by_period and by_entity & by_period:
        return by_entity & by_period
    return by_entity or by_period


def _hits(result) -> list[tuple[int, float]]:
    """Accept (ids, scores) pairs or a list of (id, score) from the index."""
    if isinstance(result, tuple) and len(result) == 2 and not isinstance(result[0], (int, np.integer)):
        ids, scores = result
        return [(int(i), float(s)) for i, s in zip(ids, scores)]
    return [(int(i), float(s)) for i, s in result]


def retrieve(*, query: str, user, k: int = 8, filters: dict[str, Any] | None = None) -> list[RetrievedChunk]:
    """The k best chunks for a question among what ``user`` may see, best first."""
    from ingestion.fusion import hybrid_weights, rrf

    query = (query or "").strip()
    if not query:
        raise ValueError("The question is empty.")
    if not 1 <= int(k) <= MAX_K:
        raise ValueError(f"k must be between 1 and {MAX_K}.")
    allowed = chunk_ids_for_user(user=user, filters=filters)
    if not allowed:
        return []
    candidates = max(4 * k, 32)
    reader = _reader(str(settings.INDEX_DIR))
    emb = _embedder()
    qvec = np.asarray(emb.embed([query]), dtype=np.float32)[0]
    weights = list(hybrid_weights(query, languages=getattr(emb, "languages", None)))  # (dense, BM25)
    allowed_arr = np.fromiter(allowed, dtype=np.int64, count=len(allowed))
    rankings = [_hits(reader.dense(qvec, candidates, allowed_arr)), _hits(reader.bm25(query, candidates, allowed_arr))]
    visible_docs = document_list_for_user(user=user, filters=filters).filter(status=Status.INDEXED)
    named = named_documents(query=query, documents=visible_docs)
    if named:
        boosted = set(Chunk.objects.filter(document_id__in=named).values_list("pk", flat=True)) & allowed
        if boosted:
            boosted_arr = np.fromiter(boosted, dtype=np.int64, count=len(boosted))
            rankings += [
                _hits(reader.dense(qvec, candidates, boosted_arr)),
                _hits(reader.bm25(query, candidates, boosted_arr)),
            ]
            weights *= 2
    fused = [(cid, score) for cid, score in rrf(rankings, k=RRF_K, weights=weights) if cid in allowed][:k]
    rows = {
        c.pk: c
        for c in Chunk.objects.filter(pk__in=[cid for cid, _ in fused]).select_related("document").only(
            "pk", "text", "page_start", "page_end", "heading_path",
            "document__id", "document__title", "document__original_name",
        )
    }
    out: list[RetrievedChunk] = []
    for cid, score in fused:
        c = rows.get(cid)
        if c is None:  # deleted since the index was published
            continue
        doc: Document = c.document
        out.append(
            RetrievedChunk(
                chunk_id=cid, score=score, document_id=doc.pk, title=doc.title, original_name=doc.original_name,
                page_start=c.page_start, page_end=c.page_end, heading_path=list(c.heading_path or []), text=c.text,
            )
        )
    return out
