"""Dense query latency and recall@10 of the index store at 10k / 100k / 1M synthetic clustered vectors.

Goes through the real IndexWriter.publish() and IndexReader.dense(); exact search (numpy) is the truth.
Prints a table and saves benchmarks/results/retrieval_latency.json.

    .venv/bin/python benchmarks/retrieval_latency.py                 # 10k, 100k, 1M (about 15 min on 2 cores)
    .venv/bin/python benchmarks/retrieval_latency.py --sizes 10000   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ingestion.index import IndexReader, IndexWriter  # noqa: E402

DIM = 384
K = 10
RESULTS = Path(__file__).resolve().parent / "results" / "retrieval_latency.json"


def clustered(rng: np.random.Generator, n: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors scattered around random cluster centres (cosine to centre about 0.5-0.8, like sentence embeddings)."""
    which = rng.integers(len(centers), size=n)
    spread = rng.uniform(0.035, 0.07, size=(n, 1)).astype(np.float32)
    x = centers[which] + spread * rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_top(vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    """Exact top-k ids per query (chunked matmul over possibly memory-mapped vectors)."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for lo in range(0, len(vectors), 200_000):
        s = queries @ np.asarray(vectors[lo : lo + 200_000]).T
        cand_s = np.concatenate([best_s, s], axis=1)
        cand_i = np.concatenate([best_i, np.broadcast_to(ids[lo : lo + 200_000], s.shape)], axis=1)
        part = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, part, 1), np.take_along_axis(cand_i, part, 1)
    return [set(row.tolist()) for row in best_i]


def timed(reader: IndexReader, queries: np.ndarray, allowed: np.ndarray | None) -> tuple[list[list[int]], np.ndarray]:
    """Hits and per-query (wall ms, CPU ms of the calling thread); CPU time ignores waits for a busy host's cores."""
    for q in queries[:10]:  # warm-up
        reader.dense(q, K, allowed_ids=allowed)
    hits, ms = [], []
    for q in queries:
        t0, c0 = time.perf_counter(), time.thread_time()
        got = reader.dense(q, K, allowed_ids=allowed)
        ms.append(((time.perf_counter() - t0) * 1000, (time.thread_time() - c0) * 1000))
        hits.append([i for i, _ in got])
    return hits, np.asarray(ms)


def summary(hits: list[list[int]], truth: list[set[int]], ms: np.ndarray) -> dict:
    rec = np.mean([len(set(h) & t) / len(t) for h, t in zip(hits, truth)])
    wall, cpu = ms[:, 0], ms[:, 1]
    return {"recall_at_10": round(float(rec), 4), "p50_ms": round(float(np.percentile(wall, 50)), 3),
            "p95_ms": round(float(np.percentile(wall, 95)), 3), "mean_ms": round(float(wall.mean()), 3),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 3), "cpu_p95_ms": round(float(np.percentile(cpu, 95)), 3)}


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_size(
    n: int, *, n_queries: int, ef_values: list[int], workdir: Path, seed: int, build_threads: int, hnsw_m: int, ef_construction: int
) -> dict:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(n // 500, 50), DIM)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    index_dir = workdir / f"n{n}"
    t0 = time.perf_counter()
    with IndexWriter.open(index_dir, dim=DIM, build_threads=build_threads, hnsw_m=hnsw_m, ef_construction=ef_construction) as w:
        for lo in range(0, n, 100_000):
            m = min(100_000, n - lo)
            w.upsert(np.arange(lo, lo + m, dtype=np.int64), clustered(rng, m, centers), [""] * m)
        gen_s = time.perf_counter() - t0
        w.publish()
    build_s = time.perf_counter() - t0 - gen_s
    del w  # the writer's copies of vectors and graph
    reader = IndexReader(index_dir, threads=1)
    snap = reader._snapshot()
    queries = clustered(rng, n_queries, centers)
    all_ids = np.arange(n, dtype=np.int64)
    truth = exact_top(snap.vectors, all_ids, queries, K)
    out: dict = {"n": n, "kind": snap.kind, "build_s": round(build_s, 1), "load_count": reader.count, "runs": {}}
    for ef in ef_values if snap.kind == "hnsw" else [None]:
        reader.ef_search = ef
        hits, ms = timed(reader, queries, None)
        out["runs"][f"ef{ef}" if ef else "exact"] = summary(hits, truth, ms)
    # allow-lists (ACL + filters): random subsets of 1 %, 10 % and 50 % of the ids
    best_ef = next((ef for ef in ef_values if out["runs"].get(f"ef{ef}", {}).get("recall_at_10", 0) >= 0.95), ef_values[-1])
    reader.ef_search = best_ef if snap.kind == "hnsw" else None
    out["ef_search_chosen"] = reader.ef_search
    reader.threads = 2  # same queries with two OpenMP threads per query
    hits, ms = timed(reader, queries, None)
    out["runs"][f"{'ef' + str(best_ef) if snap.kind == 'hnsw' else 'exact'} threads=2"] = summary(hits, truth, ms)
    reader.threads = 1
    out["allow_lists"] = {}
    for share in (0.01, 0.1, 0.5):
        allowed = np.sort(rng.choice(n, size=int(n * share), replace=False)).astype(np.int64)
        sub_truth = exact_top(np.asarray(snap.vectors[allowed]), allowed, queries, K)
        hits, ms = timed(reader, queries, allowed)
        assert all(set(h) <= set(allowed.tolist()) for h in hits[:5])
        out["allow_lists"][f"{share:.0%}"] = summary(hits, sub_truth, ms)
    out["peak_rss_gb"] = round(rss_gb(), 2)
    del reader, snap
    shutil.rmtree(index_dir, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--ef", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    ap.add_argument("--build-threads", type=int, default=2)
    ap.add_argument("--hnsw-m", type=int, default=32)
    ap.add_argument("--ef-construction", type=int, default=80)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="kd-retrieval-bench-"))
    results = []
    try:
        for n in args.sizes:
            r = bench_size(n, n_queries=args.queries, ef_values=args.ef, workdir=workdir, seed=n, build_threads=args.build_threads,
                          hnsw_m=args.hnsw_m, ef_construction=args.ef_construction)
            results.append(r)
            print(f"n={n:>9,} {r['kind']:5} build {r['build_s']:7.1f}s  peak RSS {r['peak_rss_gb']:.2f} GB")
            for name, s in {**r["runs"], **{f"allow {k}": v for k, v in r["allow_lists"].items()}}.items():
                print(f"   {name:18} recall@10 {s['recall_at_10']:.4f}  p50 {s['p50_ms']:7.2f} ms  p95 {s['p95_ms']:7.2f} ms"
                      f"  (CPU p50 {s['cpu_p50_ms']:6.2f} p95 {s['cpu_p95_ms']:6.2f} ms)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    payload = {
        "benchmark": "retrieval_latency",
        "command": "python " + " ".join(["benchmarks/retrieval_latency.py", *sys.argv[1:]]),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "faiss": faiss.__version__,
                    "build_threads": args.build_threads, "query_threads": "1 (per-query OpenMP threads; one row with 2)",
                    "note": "shared machine: 8 other helpers were running builds and tests at the same time; "
                            "latencies are single queries, one after another, through IndexReader.dense(); p50/p95_ms are "
                            "wall clock (include waiting for a core), cpu_*_ms the calling thread's CPU time (the work itself)",
                    "load_average_at_end": os.getloadavg()},
        "setup": {"dim": DIM, "k": K, "queries": args.queries, "hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction,
                  "data": "synthetic clustered unit vectors (n/500 clusters), queries drawn from the same clusters",
                  "allow_lists": "random subsets; <=20k ids (or <=2 %) searched exactly, larger through a FAISS bitmap selector"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
