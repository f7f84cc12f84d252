"""IndexWriter / IndexReader in one process: results checked against brute-force numpy, real FAISS files."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ingestion.bm25 import tokenize
from ingestion.fusion import rrf
from ingestion.index import IndexLockedError, IndexReader, IndexWriter

DIM = 24
KINDS = {"flat": 50_000, "hnsw": 10}  # exact_threshold that gives each kind at these sizes
WORDS = "revenue margin guidance dividend capex inventory backlog churn leverage coupon".split()


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def texts_for(ids: np.ndarray) -> list[str]:
    return [f"chunk {i} about {WORDS[i % len(WORDS)]} in {2000 + i % 7}" for i in ids.tolist()]


def brute(truth: dict[int, np.ndarray], q: np.ndarray, k: int, allowed: np.ndarray | None = None) -> list[int]:
    ids = np.array(sorted(truth if allowed is None else set(truth) & set(allowed.tolist())), dtype=np.int64)
    if ids.size == 0:
        return []
    scores = np.stack([truth[i] for i in ids.tolist()]) @ q
    order = np.lexsort((ids, -scores))[:k]
    return ids[order].tolist()


def recall(got: list[tuple[int, float]], want: list[int]) -> float:
    return len({i for i, _ in got} & set(want)) / max(len(want), 1)


@pytest.fixture(params=sorted(KINDS))
def kind(request) -> str:
    return request.param


def test_reader_before_any_publish_is_empty(tmp_path: Path) -> None:
    r = IndexReader(tmp_path)
    assert (r.version, r.count) == (0, 0)
    assert r.dense(np.ones(DIM, dtype=np.float32) / DIM**0.5, 5) == []
    assert r.bm25("revenue", 5) == []


def test_upsert_delete_replace_match_brute_force(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(1)
    ids = rng.choice(10**9, size=600, replace=False).astype(np.int64)
    vecs = unit(rng, 600)
    truth = dict(zip(ids.tolist(), vecs))
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=KINDS[kind]) as w:
        w.upsert(ids[:400], vecs[:400], texts_for(ids[:400]))
        assert w.publish() == 1
        w.upsert(ids[400:], vecs[400:], texts_for(ids[400:]))  # appended incrementally
        gone = ids[:50]
        w.delete(gone)
        for i in gone.tolist():
            del truth[i]
        new = unit(rng, 30)
        w.upsert(ids[100:130], new, texts_for(ids[100:130]))  # replaces
        truth.update(zip(ids[100:130].tolist(), new))
        assert w.publish() == 2
    r = IndexReader(tmp_path)
    assert (r.version, r.count) == (2, len(truth))
    np.testing.assert_array_equal(r.ids(), sorted(truth))
    queries = unit(rng, 25)
    rec = []
    for q in queries:
        got = r.dense(q, 10)
        want = brute(truth, q, 10)
        assert not {i for i, _ in got} & set(gone.tolist())
        if kind == "flat":
            assert [i for i, _ in got] == want
            np.testing.assert_allclose([s for _, s in got], [float(truth[i] @ q) for i in want], rtol=1e-5, atol=1e-5)
        rec.append(recall(got, want))
    assert np.mean(rec) >= (1.0 if kind == "flat" else 0.95)
    # The replaced vector is found as itself, its old vector is gone.
    top = r.dense(new[0], 1)[0]
    assert top[0] == int(ids[100]) and top[1] == pytest.approx(1.0, abs=1e-4)
    assert r._snapshot().kind == kind


def test_deleted_ids_never_returned_even_when_allowed(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(2)
    ids = np.arange(200, dtype=np.int64)
    vecs = unit(rng, 200)
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=KINDS[kind]) as w:
        w.upsert(ids, vecs, texts_for(ids))
        w.publish()
        w.delete(ids[::2])
        w.delete(ids[::2])  # deleting twice is harmless
        w.publish()
    r = IndexReader(tmp_path)
    assert r.count == 100
    for q in [vecs[0], vecs[2], vecs[10]]:
        for allowed in (None, ids[:20], ids[::2]):
            hits = r.dense(q, 50, allowed_ids=allowed)
            assert all(i % 2 == 1 for i, _ in hits), hits
    assert r.dense(vecs[0], 5, allowed_ids=ids[::2]) == []
    assert all(i % 2 == 1 for i, _ in r.bm25("revenue margin 2003", 200))
    assert r.bm25("revenue", 10, allowed_ids=ids[::2]) == []


@pytest.mark.parametrize("share", [0.05, 0.6])  # exact-subset path and FAISS selector path
def test_allowed_ids_respected(tmp_path: Path, kind: str, share: float) -> None:
    rng = np.random.default_rng(3)
    n = 1500
    ids = np.arange(10, 10 + n, dtype=np.int64) * 3
    vecs = unit(rng, n)
    truth = dict(zip(ids.tolist(), vecs))
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=KINDS[kind]) as w:
        w.upsert(ids, vecs, texts_for(ids))
        w.publish()
    r = IndexReader(tmp_path)
    allowed = rng.choice(ids, size=int(n * share), replace=False)
    allowed_with_unknown = np.concatenate([allowed, [1, 2, 10**12]])  # unknown ids are ignored
    rec = []
    for q in unit(rng, 20):
        got = r.dense(q, 10, allowed_ids=allowed_with_unknown)
        assert {i for i, _ in got} <= set(allowed.tolist())
        want = brute(truth, q, 10, allowed)
        if kind == "flat":
            assert [i for i, _ in got] == want
        rec.append(recall(got, want))
        kw = r.bm25(WORDS[int(rng.integers(len(WORDS)))], 10, allowed_ids=allowed)
        assert kw and {i for i, _ in kw} <= set(allowed.tolist())
    assert np.mean(rec) >= 0.95


def test_bm25_scores_follow_the_okapi_formula(tmp_path: Path) -> None:
    docs = ["apple apple banana", "banana cherry", "cherry cherry cherry date", "apple date"]
    ids = np.array([11, 12, 13, 14])
    with IndexWriter.open(tmp_path, dim=DIM) as w:
        w.upsert(ids, unit(np.random.default_rng(0), 4), docs)
        w.publish()
    got = dict(IndexReader(tmp_path).bm25("apple date", 10))
    toks = [d.split() for d in docs]
    avg = np.mean([len(t) for t in toks])
    want = {}
    for doc_id, t in zip(ids.tolist(), toks):
        s = 0.0
        for term in ("apple", "date"):
            df = sum(term in x for x in toks)
            idf = np.log(1 + (4 - df + 0.5) / (df + 0.5))
            tf = t.count(term)
            s += idf * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(t) / avg))
        if s > 0:
            want[doc_id] = s
    assert got.keys() == want.keys()
    for doc_id, s in want.items():
        assert got[doc_id] == pytest.approx(s, rel=1e-5)


def test_rebuild_compaction_and_reopen_keep_results_exact(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    ids = np.arange(1000, dtype=np.int64)
    vecs = unit(rng, 1000)
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=300) as w:
        w.upsert(ids, vecs, texts_for(ids))
        w.publish()
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=300) as w:  # reopened: state read back from disk
        assert w.count == 1000
        w.delete(ids[:400])  # 40 % dead: compacted
        w.publish()
        meta = json.loads((tmp_path / (tmp_path / "CURRENT").read_text().strip() / "meta.json").read_text())
        assert meta["rows"] == meta["live"] == 600 and meta["kind"] == "hnsw"
        w.upsert(ids[:10], vecs[:10], texts_for(ids[:10]))  # the HNSW graph is extended, not rebuilt
        w.publish()
    r = IndexReader(tmp_path)
    assert r.count == 610
    assert r.dense(vecs[5], 1)[0][0] == 5
    assert {i for i, _ in r.dense(vecs[200], 20, allowed_ids=ids[:400])} <= set(range(10))  # deleted, bar the re-added
    # rebuild from scratch: only the new items survive, and the kind follows the size
    items = [(int(i) + 5000, v, "rebuilt text") for i, v in zip(ids[:50], vecs[:50])]
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=300) as w:
        w.rebuild(iter(items))
        w.publish()
    assert r.count == 50 and r._snapshot().kind == "flat"
    assert [i for i, _ in r.dense(vecs[7], 1)] == [5007]
    assert {i for i, _ in r.bm25("rebuilt", 100)} == set(range(5000, 5050))
    versions = sorted(p.name for p in tmp_path.glob("v*"))
    assert len(versions) == 3 and versions[-1] == (tmp_path / "CURRENT").read_text().strip()  # old ones GC'd


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(ids=np.array([1, 1])), "unique"),
        (dict(ids=np.array([-4, 5])), "non-negative"),
        (dict(ids=np.array([1.5, 2.0])), "integers"),
        (dict(vectors=np.ones((2, DIM + 1), dtype=np.float32)), "shape"),
        (dict(vectors=np.full((2, DIM), np.nan, dtype=np.float32)), "NaN"),
        (dict(vectors=np.zeros((2, DIM), dtype=np.float32)), "zero"),
        (dict(texts=["only one"]), "strings"),
    ],
)
def test_bad_input_is_refused_and_loses_nothing(tmp_path: Path, bad: dict, message: str) -> None:
    rng = np.random.default_rng(5)
    good = dict(ids=np.array([7, 8]), vectors=unit(rng, 2), texts=["a revenue", "b margin"])
    with IndexWriter.open(tmp_path, dim=DIM) as w:
        w.upsert(**good)
        w.publish()
        with pytest.raises(ValueError, match=message):
            w.upsert(**{**good, **bad})
        w.publish()
    r = IndexReader(tmp_path)
    assert r.count == 2 and r.dense(good["vectors"][1], 1)[0][0] == 8
    with pytest.raises(ValueError, match="dim"):
        r.dense(np.ones(DIM + 2, dtype=np.float32), 3)
    with pytest.raises(ValueError, match="dim 24"):
        IndexWriter(tmp_path, dim=DIM * 2)


def test_unnormalised_vectors_are_normalised(tmp_path: Path) -> None:
    with IndexWriter.open(tmp_path, dim=DIM) as w:
        w.upsert(np.array([1, 2]), np.eye(2, DIM, dtype=np.float32) * np.array([[5.0], [0.2]], dtype=np.float32), ["x", "y"])
        w.publish()
    hits = IndexReader(tmp_path).dense(np.eye(1, DIM, dtype=np.float32)[0], 2)
    assert hits[0][0] == 1 and hits[0][1] == pytest.approx(1.0, abs=1e-6)


def test_second_writer_is_refused_or_waits_for_the_lock(tmp_path: Path) -> None:
    w = IndexWriter(tmp_path, dim=DIM)
    with pytest.raises(IndexLockedError, match="locked by another writer"):
        IndexWriter(tmp_path, dim=DIM)
    threading.Timer(0.3, w.close).start()
    t0 = time.monotonic()
    with IndexWriter.open(tmp_path, dim=DIM, lock_timeout=10) as w2:
        assert time.monotonic() - t0 >= 0.25
        assert w2.version == 0


def test_tokenizer_latin_numbers_and_chinese() -> None:
    assert tokenize("What was the Total Revenue in 2019: $1,496.5 million?") == ["total", "revenue", "2019", "1496.5", "million"]
    toks = tokenize("中华人民共和国的国内生产总值是多少")
    assert "中华" in toks and "国内" in toks and "生产总值" in toks and "的" not in toks and "多少" not in toks


def test_chinese_bm25_finds_cmrc_passage_by_a_phrase(tmp_path: Path, shared_dir: Path) -> None:
    queries = json.loads((shared_dir / "eval/cmrc2018/queries.json").read_text())["queries"]
    contexts = list(dict.fromkeys(q["context"] for q in queries))
    assert len(contexts) > 100  # 500 questions over 137 passages
    ids = np.arange(len(contexts), dtype=np.int64) + 100
    with IndexWriter.open(tmp_path, dim=DIM) as w:
        w.upsert(ids, unit(np.random.default_rng(6), len(contexts)), contexts)
        w.publish()
    r = IndexReader(tmp_path)
    picks = np.random.default_rng(7).choice(len(contexts), size=40, replace=False)
    top1 = 0
    for i in picks.tolist():
        text = contexts[i]
        mid = len(text) // 2
        phrase = text[mid : mid + 14]
        hits = r.bm25(phrase, 5)
        assert int(ids[i]) in [h for h, _ in hits], (phrase, hits)
        top1 += hits[0][0] == ids[i]
    assert top1 >= 36  # a 14-character phrase nearly always ranks its own passage first


def test_rrf_fuses_by_rank_with_weights() -> None:
    dense = [(1, 0.9), (2, 0.8), (3, 0.1)]
    keyword = [(3, 12.0), (1, 7.0), (4, 1.0)]
    fused = rrf([dense, keyword], k=60)
    scores = dict(fused)
    assert scores[1] == pytest.approx(1 / 61 + 1 / 62)
    assert scores[3] == pytest.approx(1 / 63 + 1 / 61)
    assert scores[2] == pytest.approx(1 / 62) and scores[4] == pytest.approx(1 / 63)
    assert [i for i, _ in fused] == [1, 3, 2, 4]
    weighted = rrf([dense, keyword], k=60, weights=[0.0, 1.0])
    assert [i for i, _ in weighted][:3] == [3, 1, 4]
    with pytest.raises(ValueError, match="weights"):
        rrf([dense, keyword], weights=[1.0])
