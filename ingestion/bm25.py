"""Keyword search: one tokeniser for texts and queries, and Okapi BM25 over a sparse term-count matrix.

Term counts are kept per row (a CSR matrix rows x vocabulary), so new rows are tokenised once and
appended; document frequencies, lengths and idf are derived from the live rows when a version loads.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.sparse as sp

K1 = 1.2
B = 0.75

STOPWORDS = frozenset(
    # English: articles, auxiliaries, pronouns, prepositions, question words.
    "a an the and or of to in on at by for from with as is are was were be been being it its this that these those "
    "what which who whom whose when where why how do does did has have had i you he she we they them his her our "
    "their my your not no".split()
    # Chinese: particles, copulas, question words, punctuation-like fillers.
    + "的 了 是 在 和 与 及 或 也 都 就 而 被 把 对 于 为 之 其 中 由 从 这 那 个 有 吗 呢 吧 啊 什么 哪 哪个 哪些 哪里 谁 "
    "多少 几 怎么 怎样 如何 为什么 是否".split()
)

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN_RE = re.compile(rf"([{_CJK}]+)|(\d+(?:[.,]\d+)*)|([^\W\d_{_CJK}]+)")


@lru_cache(maxsize=1)
def _jieba():
    """A jieba tokenizer, initialised once per process (quietly)."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    tk = jieba.Tokenizer()
    tk.initialize()
    return tk


def tokenize(text: str) -> list[str]:
    """Lowercase words and numbers for Latin text, jieba search-mode words for Chinese; stopwords dropped."""
    tokens: list[str] = []
    for cjk, number, word in _TOKEN_RE.findall(text.lower()):
        if cjk:
            tokens.extend(t for t in _jieba().lcut_for_search(cjk) if t.strip() and t not in STOPWORDS)
        elif number:
            tokens.append(number.replace(",", ""))
        elif word not in STOPWORDS:
            tokens.append(word)
    return tokens


class Vocabulary:
    """Term -> column number; grows as new terms are seen (columns are never renumbered)."""

    def __init__(self, terms: list[str] | None = None) -> None:
        self.terms: list[str] = list(terms or [])
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.terms)}

    def __len__(self) -> int:
        return len(self.terms)

    def add(self, term: str) -> int:
        col = self.index.get(term)
        if col is None:
            col = self.index[term] = len(self.terms)
            self.terms.append(term)
        return col


def count_matrix(texts: list[str], *, vocab: Vocabulary) -> sp.csr_matrix:
    """Tokenise ``texts`` and return their term counts (rows x len(vocab)), growing ``vocab``."""
    indptr = [0]
    indices: list[int] = []
    data: list[int] = []
    for text in texts:
        counts: dict[int, int] = {}
        for tok in tokenize(text):
            col = vocab.add(tok)
            counts[col] = counts.get(col, 0) + 1
        indices.extend(counts.keys())
        data.extend(counts.values())
        indptr.append(len(indices))
    return sp.csr_matrix(
        (np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32), np.asarray(indptr, dtype=np.int64)),
        shape=(len(texts), len(vocab)),
    )


def stack_rows(parts: list[sp.csr_matrix], *, n_cols: int) -> sp.csr_matrix:
    """Stack CSR blocks built against a growing vocabulary into one matrix with ``n_cols`` columns."""
    widened = [sp.csr_matrix((p.data, p.indices, p.indptr), shape=(p.shape[0], n_cols)) for p in parts if p.shape[0]]
    if not widened:
        return sp.csr_matrix((0, n_cols), dtype=np.float32)
    return sp.vstack(widened, format="csr", dtype=np.float32)


@dataclass(frozen=True)
class BM25Scorer:
    """Read-only BM25 over the live rows of a count matrix."""

    tf: sp.csc_matrix  # (rows, vocab), column access for query terms
    norm: np.ndarray  # (rows,) k1 * (1 - b + b * len / avglen)
    idf: np.ndarray  # (vocab,)
    vocab: dict[str, int]
    live: np.ndarray  # (rows,) bool

    @classmethod
    def build(cls, counts: sp.csr_matrix, *, terms: list[str], live: np.ndarray) -> "BM25Scorer":
        assert counts.shape == (live.shape[0], len(terms)), (counts.shape, live.shape, len(terms))
        lengths = np.asarray(counts.sum(axis=1)).ravel().astype(np.float32)
        n_live = int(live.sum())
        avglen = float(lengths[live].mean()) if n_live else 1.0
        live_counts = counts[np.flatnonzero(live)] if n_live < live.shape[0] else counts
        df = np.bincount(live_counts.indices, minlength=len(terms)).astype(np.float32)
        idf = np.log1p((n_live - df + 0.5) / (df + 0.5)).astype(np.float32)
        norm = (K1 * (1.0 - B + B * lengths / max(avglen, 1e-9))).astype(np.float32)
        return cls(tf=counts.tocsc(), norm=norm, idf=idf, vocab={t: i for i, t in enumerate(terms)}, live=live)

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every row for ``query`` (dead rows score 0)."""
        out = np.zeros(self.tf.shape[0], dtype=np.float32)
        for tok in tokenize(query):  # a repeated query term counts again, as in Okapi BM25
            col = self.vocab.get(tok)
            if col is None:
                continue
            lo, hi = self.tf.indptr[col], self.tf.indptr[col + 1]
            rows, tf = self.tf.indices[lo:hi], self.tf.data[lo:hi]
            out[rows] += self.idf[col] * tf * (K1 + 1.0) / (tf + self.norm[rows])
        out[~self.live] = 0.0
        return out
