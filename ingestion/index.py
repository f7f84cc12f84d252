"""Versioned search indexes (FAISS dense + BM25 keyword) with one locked writer and self-reloading readers.

Layout of ``index_dir``::

    .lock           fcntl lock, held by the one IndexWriter for its whole lifetime
    CURRENT         name of the published version folder, replaced atomically (os.replace)
    v00000007/      meta.json, row_ids.npy, vectors.npy, bm25_counts.npz, bm25_terms.json [, hnsw.faiss]
    .tmp-v*/        a version being written; never read, removed by the next writer

Every upserted vector gets a row. Replacing or deleting an id marks its old row dead (-1 in row_ids),
so a new version appends to the previous one (the HNSW graph is extended, term counts appended) until
dead rows pass ``COMPACT_DEAD_FRACTION`` or the index kind changes; then rows are compacted and rebuilt.
Below ``exact_threshold`` live rows the dense index is exact (IndexFlatIP), above it HNSW.

A second writer waits up to ``lock_timeout`` seconds (default 0: fail at once) and then gets
IndexLockedError. Changes not published before ``close()`` are discarded.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp

from ingestion.bm25 import BM25Scorer, Vocabulary, count_matrix, stack_rows

FORMAT = 1
CURRENT = "CURRENT"
COMPACT_DEAD_FRACTION = 0.25
EXACT_SUBSET_MAX = 20_000  # HNSW: allow-lists up to this many live rows are searched exactly
EXACT_SUBSET_FRACTION = 0.02  # ... or up to this share of the live rows
REBUILD_BATCH = 4096


class IndexLockedError(RuntimeError):
    """Another IndexWriter holds the index folder's lock."""


class IndexCorruptError(RuntimeError):
    """The published version named by CURRENT cannot be read."""


def _version_name(version: int) -> str:
    return f"v{version:08d}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_current(index_dir: Path) -> str | None:
    try:
        name = (index_dir / CURRENT).read_text().strip()
    except FileNotFoundError:
        return None
    return name or None


def _acquire_lock(path: Path, *, timeout: float) -> int:
    """Take the exclusive writer lock, polling up to ``timeout`` seconds; returns the open fd."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + max(timeout, 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise IndexLockedError(
                    f"index {path.parent} is locked by another writer (pid {holder}); only one IndexWriter may run at a time"
                ) from None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def _as_ids(ids: np.ndarray | Iterable[int]) -> np.ndarray:
    arr = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D array of integers, got shape {arr.shape} dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if (arr < 0).any():
        raise ValueError(f"ids must be non-negative, got {arr[arr < 0][:5].tolist()}")
    return arr


def _as_vectors(vectors: np.ndarray, *, n: int, dim: int) -> np.ndarray:
    arr = np.ascontiguousarray(vectors, dtype=np.float32)
    if arr.shape != (n, dim):
        raise ValueError(f"vectors must have shape ({n}, {dim}), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("vectors contain NaN or infinity")
    norms = np.linalg.norm(arr, axis=1)
    if (norms < 1e-6).any():
        raise ValueError(f"vectors at positions {np.flatnonzero(norms < 1e-6)[:5].tolist()} are zero")
    if np.abs(norms - 1.0).max(initial=0.0) > 1e-3:
        arr = arr / norms[:, None]  # cosine similarity needs unit vectors
    return arr


class IndexWriter:
    """The single writer of an index folder: stage upserts/deletes in memory, then ``publish()`` a version."""

    def __init__(
        self,
        index_dir: Path | str,
        *,
        dim: int,
        exact_threshold: int = 50_000,
        lock_timeout: float = 0.0,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
        keep_versions: int = 3,
        build_threads: int | None = None,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.index_dir = Path(index_dir)
        self.index_dir.mkdir(parents=True, exist_ok=True)
        self.dim, self.exact_threshold = dim, exact_threshold
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.keep_versions = max(keep_versions, 2)
        self.build_threads = build_threads or os.cpu_count() or 1  # OpenMP threads for HNSW construction
        self._lock_fd: int | None = _acquire_lock(self.index_dir / ".lock", timeout=lock_timeout)
        try:
            self._remove_stale_tmp()
            self._load_current()
        except BaseException:
            self.close()
            raise

    @classmethod
    def open(cls, index_dir: Path | str, **kwargs) -> "IndexWriter":
        """Same as the constructor; reads well in ``with IndexWriter.open(d, dim=384) as w:``."""
        return cls(index_dir, **kwargs)

    def __enter__(self) -> "IndexWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock; unpublished changes are dropped."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the fd drops the flock
            self._lock_fd = None

    # -- state ----------------------------------------------------------------------------------------
    def _reset(self) -> None:
        self._row_ids = np.zeros(0, dtype=np.int64)  # committed rows, -1 = dead
        self._vectors = np.zeros((0, self.dim), dtype=np.float32)
        self._counts = sp.csr_matrix((0, 0), dtype=np.float32)
        self._vocab = Vocabulary()
        self._new_ids: list[np.ndarray] = []
        self._new_vectors: list[np.ndarray] = []
        self._new_counts: list[sp.csr_matrix] = []
        self._dead_new: set[int] = set()
        self._pos: dict[int, int] = {}
        self._n_rows = 0
        self._hnsw: faiss.Index | None = None
        self._hnsw_file: Path | None = None
        self._kind = "flat"

    def _load_current(self) -> None:
        self._reset()
        name = _read_current(self.index_dir)
        self._version = int(name[1:]) if name else 0  # a newer orphan folder (never published) gets overwritten
        if name is None:
            return
        vdir = self.index_dir / name
        try:
            meta = json.loads((vdir / "meta.json").read_text())
            row_ids = np.load(vdir / "row_ids.npy")
            vectors = np.load(vdir / "vectors.npy")
            counts = sp.load_npz(vdir / "bm25_counts.npz").tocsr()
            terms = json.loads((vdir / "bm25_terms.json").read_text())
        except (OSError, ValueError) as e:
            raise IndexCorruptError(f"cannot read published index {vdir}: {e}; rebuild it (manage.py rebuild_index)") from e
        if meta["dim"] != self.dim:
            raise ValueError(f"index {self.index_dir} holds dim {meta['dim']} vectors, writer opened with dim {self.dim}")
        self._row_ids, self._vectors, self._counts = row_ids.astype(np.int64), vectors, counts
        self._vocab = Vocabulary(terms)
        live = np.flatnonzero(row_ids >= 0)
        self._pos = dict(zip(row_ids[live].tolist(), live.tolist()))
        self._n_rows = len(row_ids)
        self._kind = meta["kind"]
        if self._kind == "hnsw":
            self._hnsw_file = vdir / "hnsw.faiss"

    def _remove_stale_tmp(self) -> None:
        for p in self.index_dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _kill(self, row: int) -> None:
        if row < len(self._row_ids):
            self._row_ids[row] = -1
        else:
            self._dead_new.add(row)

    @property
    def version(self) -> int:
        """Newest version number written to this folder (0: none)."""
        return self._version

    @property
    def count(self) -> int:
        """Live ids, including unpublished changes."""
        return len(self._pos)

    # -- changes --------------------------------------------------------------------------------------
    def upsert(self, ids: np.ndarray, vectors: np.ndarray, texts: list[str]) -> None:
        """Add or replace ``ids`` with their unit vectors and texts (staged until publish)."""
        ids = _as_ids(ids)
        n = len(ids)
        if len(np.unique(ids)) != n:
            raise ValueError("ids must be unique within one upsert")
        vecs = _as_vectors(vectors, n=n, dim=self.dim)
        texts = list(texts)
        if len(texts) != n or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"texts must be {n} strings, one per id")
        if n == 0:
            return
        counts = count_matrix(texts, vocab=self._vocab)
        for i, doc_id in enumerate(ids.tolist()):
            old = self._pos.get(doc_id)
            if old is not None:
                self._kill(old)
            self._pos[doc_id] = self._n_rows + i
        self._new_ids.append(ids)
        self._new_vectors.append(vecs)
        self._new_counts.append(counts)
        self._n_rows += n

    def delete(self, ids: np.ndarray) -> None:
        """Remove ``ids`` (unknown ids are ignored, so deleting twice is harmless)."""
        for doc_id in _as_ids(ids).tolist():
            row = self._pos.pop(doc_id, None)
            if row is not None:
                self._kill(row)

    def rebuild(self, items: Iterable[tuple[int, np.ndarray, str]]) -> None:
        """Replace everything with ``items`` of (id, vector, text); published from scratch by the next publish()."""
        self._reset()
        batch: list[tuple[int, np.ndarray, str]] = []
        for item in items:
            batch.append(item)
            if len(batch) >= REBUILD_BATCH:
                self._upsert_batch(batch)
                batch = []
        self._upsert_batch(batch)

    def _upsert_batch(self, batch: list[tuple[int, np.ndarray, str]]) -> None:
        if batch:
            ids, vecs, texts = zip(*batch)
            self.upsert(np.asarray(ids, dtype=np.int64), np.stack([np.asarray(v, dtype=np.float32) for v in vecs]), list(texts))

    # -- publication ----------------------------------------------------------------------------------
    def publish(self) -> int:
        """Write a new version (tmp dir, fsync, rename), point CURRENT at it atomically, GC old ones."""
        row_ids = np.concatenate([self._row_ids, *self._new_ids]) if self._new_ids else self._row_ids.copy()
        if self._dead_new:
            row_ids[np.fromiter(self._dead_new, dtype=np.int64)] = -1
        vectors = np.concatenate([self._vectors, *self._new_vectors]) if self._new_vectors else self._vectors
        counts = stack_rows([self._counts, *self._new_counts], n_cols=len(self._vocab))
        live = row_ids >= 0
        n_live = int(live.sum())
        kind = "hnsw" if n_live >= self.exact_threshold else "flat"
        dead_fraction = 1.0 - n_live / len(row_ids) if len(row_ids) else 0.0
        if dead_fraction > COMPACT_DEAD_FRACTION or kind != self._kind:
            keep = np.flatnonzero(live)
            row_ids, vectors, counts = row_ids[keep], vectors[keep], counts[keep]
            self._hnsw, self._hnsw_file = None, None
        hnsw = self._extend_hnsw(vectors) if kind == "hnsw" else None

        version = self._version + 1
        name = _version_name(version)
        tmp = self.index_dir / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        meta = {
            "format": FORMAT, "version": version, "dim": self.dim, "kind": kind, "rows": len(row_ids), "live": n_live,
            "hnsw_m": self.hnsw_m, "ef_search": self.ef_search, "created_at": datetime.now(timezone.utc).isoformat(),
        }
        _write_version_files(tmp, meta=meta, row_ids=row_ids, vectors=vectors, counts=counts, terms=self._vocab.terms, hnsw=hnsw)
        final = self.index_dir / name
        _install_version(tmp, final)
        _point_current(self.index_dir, name)

        self._version = version
        self._row_ids, self._vectors, self._counts, self._kind = row_ids, vectors, counts, kind
        self._new_ids, self._new_vectors, self._new_counts, self._dead_new = [], [], [], set()
        self._n_rows = len(row_ids)
        alive = np.flatnonzero(row_ids >= 0)
        self._pos = dict(zip(row_ids[alive].tolist(), alive.tolist()))
        self._hnsw, self._hnsw_file = hnsw, (final / "hnsw.faiss" if hnsw is not None else None)
        self._collect_garbage(current=name)
        return version

    def _extend_hnsw(self, vectors: np.ndarray) -> faiss.Index:
        """HNSW over all rows: the previous graph extended with the new rows, or a fresh build."""
        if self._hnsw is None and self._hnsw_file is not None:
            self._hnsw = faiss.read_index(str(self._hnsw_file))
        if self._hnsw is None or self._hnsw.ntotal > len(vectors):
            self._hnsw = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self._hnsw.hnsw.efConstruction = self.ef_construction
        if self._hnsw.ntotal < len(vectors):
            faiss.omp_set_num_threads(self.build_threads)
            self._hnsw.add(np.ascontiguousarray(vectors[self._hnsw.ntotal:]))
        assert self._hnsw.ntotal == len(vectors)
        return self._hnsw

    def _collect_garbage(self, *, current: str) -> None:
        versions = sorted(p for p in self.index_dir.glob("v*") if p.is_dir() and p.name[1:].isdigit())
        for p in versions[: -self.keep_versions]:
            if p.name != current:
                shutil.rmtree(p, ignore_errors=True)


def _write_version_files(
    vdir: Path, *, meta: dict, row_ids: np.ndarray, vectors: np.ndarray, counts: sp.csr_matrix, terms: list[str],
    hnsw: faiss.Index | None,
) -> None:
    """Write and fsync every file of a version, then the folder itself."""
    np.save(vdir / "row_ids.npy", row_ids)
    np.save(vdir / "vectors.npy", vectors)
    sp.save_npz(vdir / "bm25_counts.npz", counts, compressed=False)
    (vdir / "bm25_terms.json").write_text(json.dumps(terms, ensure_ascii=False))
    if hnsw is not None:
        faiss.write_index(hnsw, str(vdir / "hnsw.faiss"))
    (vdir / "meta.json").write_text(json.dumps(meta, indent=1))
    for f in vdir.iterdir():
        _fsync_path(f)
    _fsync_path(vdir)


def _install_version(tmp: Path, final: Path) -> None:
    """Rename a fully written version folder into place (readers only look at it once CURRENT names it)."""
    if final.exists():  # left by a writer that died after renaming but before switching CURRENT
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_path(final.parent)


def _point_current(index_dir: Path, name: str) -> None:
    """Atomically replace CURRENT with ``name``."""
    tmp = index_dir / f".CURRENT.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, index_dir / CURRENT)
    _fsync_path(index_dir)


@dataclass(frozen=True)
class _Snapshot:
    """One loaded version, immutable, shared by concurrent queries."""

    name: str
    version: int
    dim: int
    kind: str
    row_ids: np.ndarray  # (rows,) external id per row, -1 = dead
    live_bits: np.ndarray | None  # packed bitmap of live rows, None when all rows live
    sorted_ids: np.ndarray  # live external ids, ascending
    sorted_rows: np.ndarray  # their rows
    id_to_row: np.ndarray | None  # row per external id (-1: none) when ids are dense enough for a table
    vectors: np.ndarray  # (rows, dim) view of the FAISS storage
    index: faiss.Index
    bm25: BM25Scorer
    ef_search: int  # the writer's default

    @property
    def count(self) -> int:
        return len(self.sorted_ids)

    def rows_for(self, allowed_ids: np.ndarray) -> np.ndarray:
        """Live rows of the allowed ids (unknown ids dropped; may repeat if the ids repeat)."""
        allowed = np.asarray(allowed_ids).astype(np.int64, copy=False).ravel()
        if self.id_to_row is not None:  # database primary keys are dense: one table look-up per id
            allowed = allowed[(allowed >= 0) & (allowed < len(self.id_to_row))]
            rows = self.id_to_row[allowed]
            return rows[rows >= 0]
        pos = np.minimum(np.searchsorted(self.sorted_ids, allowed), len(self.sorted_ids) - 1)
        return self.sorted_rows[pos[self.sorted_ids[pos] == allowed]]


def _load_snapshot(vdir: Path) -> _Snapshot:
    meta = json.loads((vdir / "meta.json").read_text())
    row_ids = np.load(vdir / "row_ids.npy")
    counts = sp.load_npz(vdir / "bm25_counts.npz").tocsr()
    terms = json.loads((vdir / "bm25_terms.json").read_text())
    live = row_ids >= 0
    live_rows = np.flatnonzero(live)
    order = np.argsort(row_ids[live_rows], kind="stable")
    sorted_ids = row_ids[live_rows][order]
    id_to_row = None
    if len(sorted_ids) and sorted_ids[-1] < 4 * len(sorted_ids) + 1024:
        id_to_row = np.full(int(sorted_ids[-1]) + 1, -1, dtype=np.int64)
        id_to_row[sorted_ids] = live_rows[order]
    if meta["kind"] == "hnsw":
        index = faiss.read_index(str(vdir / "hnsw.faiss"))
        storage = faiss.downcast_index(index.storage)
    else:
        index = storage = faiss.IndexFlatIP(meta["dim"])
        index.add(np.ascontiguousarray(np.load(vdir / "vectors.npy", mmap_mode="r")))
    assert storage.ntotal == len(row_ids), (storage.ntotal, len(row_ids))
    # A read-only view of the vectors FAISS holds in RAM (the snapshot keeps the index alive): exact searches over
    # allow-lists gather from here instead of a memory-mapped file that can page-fault.
    vectors = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * meta["dim"]).reshape(storage.ntotal, meta["dim"])
    vectors.flags.writeable = False
    return _Snapshot(
        name=vdir.name, version=meta["version"], dim=meta["dim"], kind=meta["kind"], row_ids=row_ids,
        live_bits=None if live.all() else np.packbits(live, bitorder="little"),
        sorted_ids=sorted_ids, sorted_rows=live_rows[order], id_to_row=id_to_row, vectors=vectors, index=index,
        bm25=BM25Scorer.build(counts, terms=terms, live=live), ef_search=meta.get("ef_search", 128),
    )


def _top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best (rows, scores), best first."""
    if len(scores) > k:
        part = np.argpartition(-scores, k - 1)[:k]
        scores, rows = scores[part], rows[part]
    order = np.argsort(-scores, kind="stable")
    return rows[order], scores[order]


class IndexReader:
    """Query the published version; a cheap stat of CURRENT on each call picks up new versions."""

    def __init__(self, index_dir: Path | str, *, ef_search: int | None = None, threads: int = 1) -> None:
        self.index_dir = Path(index_dir)
        self.ef_search = ef_search  # HNSW search depth; None: the value the writer stored
        # OpenMP threads per query, set in the calling thread only. One query on one thread is fastest on a busy
        # host: with 2 threads a 10k exact search took 60 ms instead of 0.3 ms while other processes ran.
        self.threads = threads
        self._stat_key: tuple[int, int, int] | None = None
        self._snap: _Snapshot | None = None
        self._lock = threading.Lock()

    def _snapshot(self) -> _Snapshot | None:
        try:
            st = os.stat(self.index_dir / CURRENT)
        except FileNotFoundError:
            return self._snap
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._stat_key:
            return self._snap
        with self._lock:
            if key != self._stat_key:
                self._reload(key)
        return self._snap

    def _reload(self, key: tuple[int, int, int]) -> None:
        for _attempt in range(5):  # the writer may GC a version between our read of CURRENT and the load
            name = _read_current(self.index_dir)
            if name is None:
                return
            if self._snap is not None and self._snap.name == name:
                self._stat_key = key
                return
            try:
                self._snap = _load_snapshot(self.index_dir / name)
                self._stat_key = key
                return
            except FileNotFoundError:
                time.sleep(0.05)
        raise IndexCorruptError(f"CURRENT in {self.index_dir} names {name!r}, which cannot be loaded")

    @property
    def version(self) -> int:
        snap = self._snapshot()
        return snap.version if snap else 0

    @property
    def count(self) -> int:
        snap = self._snapshot()
        return snap.count if snap else 0

    def ids(self) -> np.ndarray:
        """Live ids of the published version, ascending (for consistency checks against the database)."""
        snap = self._snapshot()
        return snap.sorted_ids.copy() if snap else np.zeros(0, dtype=np.int64)

    def dense(self, query_vec: np.ndarray, k: int, allowed_ids: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k ids by inner product with ``query_vec`` (a unit vector), restricted to ``allowed_ids``."""
        snap = self._snapshot()
        q = np.ascontiguousarray(query_vec, dtype=np.float32).reshape(-1)
        if snap is not None and q.shape[0] != snap.dim:
            raise ValueError(f"query vector has dim {q.shape[0]}, index has dim {snap.dim}")
        if snap is None or k <= 0 or snap.count == 0:
            return []
        rows = None if allowed_ids is None else snap.rows_for(allowed_ids)
        if rows is not None:
            if rows.size == 0:
                return []
            small = rows.size <= max(EXACT_SUBSET_MAX, EXACT_SUBSET_FRACTION * snap.count)
            if (snap.kind == "flat" and rows.size < snap.count // 2) or (snap.kind == "hnsw" and small):
                rows = np.unique(rows)
                faiss.omp_set_num_threads(self.threads)
                scores, found = faiss.knn(q[None, :], np.asarray(snap.vectors[rows]), min(k, rows.size), faiss.METRIC_INNER_PRODUCT)
                return [(int(snap.row_ids[rows[j]]), float(s)) for j, s in zip(found[0], scores[0]) if j >= 0]
            bits = np.zeros(len(snap.row_ids), dtype=bool)
            bits[rows] = True
            packed = np.packbits(bits, bitorder="little")
        else:
            packed = snap.live_bits
        sel = None if packed is None else faiss.IDSelectorBitmap(len(packed), faiss.swig_ptr(packed))
        if snap.kind == "hnsw":
            params = faiss.SearchParametersHNSW()
            selectivity = 1.0 if rows is None else min(rows.size / snap.count, 1.0)
            ef = self.ef_search or snap.ef_search
            params.efSearch = int(min(max(ef, k) / max(selectivity, 0.1), 1024))  # filtered-out nodes still cost hops
        else:
            params = faiss.SearchParameters()
        if sel is not None:
            params.sel = sel
        faiss.omp_set_num_threads(self.threads)
        scores, found = snap.index.search(q[None, :], k, params=params)
        return [(int(snap.row_ids[r]), float(s)) for r, s in zip(found[0], scores[0]) if r >= 0 and snap.row_ids[r] >= 0]

    def bm25(self, query: str, k: int, allowed_ids: np.ndarray | None = None) -> list[tuple[int, float]]:
        """Top-k ids by BM25 score for ``query`` (only rows matching a query term), restricted to ``allowed_ids``."""
        snap = self._snapshot()
        if snap is None or k <= 0 or snap.count == 0:
            return []
        scores = snap.bm25.scores(query)
        rows = np.flatnonzero(scores > 0) if allowed_ids is None else np.unique(snap.rows_for(allowed_ids))
        rows = rows[scores[rows] > 0]
        if rows.size == 0:
            return []
        top_rows, top_scores = _top_k(scores[rows], rows, k)
        return [(int(snap.row_ids[r]), float(s)) for r, s in zip(top_rows, top_scores)]
