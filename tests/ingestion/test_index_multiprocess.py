"""The index across processes: readers reload without restart, SIGKILL mid-publish, one writer at a time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from ingestion.index import IndexReader, IndexWriter

DIM = 16
REPO = Path(__file__).resolve().parents[2]


def unit(seed: int, n: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def python(script: str, *args: str) -> subprocess.Popen:
    """Start ``script`` in a fresh interpreter (stdin/stdout pipes, line-buffered text)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], cwd=REPO, env=env, text=True,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def publish(index_dir: Path, ids: np.ndarray, vecs: np.ndarray, *, delete: np.ndarray | None = None) -> int:
    with IndexWriter.open(index_dir, dim=DIM, exact_threshold=50) as w:
        if delete is not None:
            w.delete(delete)
        w.upsert(ids, vecs, [f"note {i} quarterly update" for i in ids.tolist()])
        return w.publish()


READER = """
    import json, sys
    import numpy as np
    from ingestion.index import IndexReader
    r = IndexReader(sys.argv[1])
    for line in sys.stdin:  # each line: a query vector; answer: version, count, top hit
        q = np.asarray(json.loads(line), dtype=np.float32)
        hits = r.dense(q, 1)
        print(json.dumps([r.version, r.count, hits[0][0] if hits else None]), flush=True)
"""


def test_reader_in_another_process_picks_up_new_versions(tmp_path: Path) -> None:
    v1 = unit(1, 40)
    publish(tmp_path, np.arange(40), v1)
    reader = python(READER, str(tmp_path))
    try:
        def ask(q: np.ndarray) -> list:
            reader.stdin.write(json.dumps(q.tolist()) + "\n")
            reader.stdin.flush()
            line = reader.stdout.readline()
            assert line, reader.stderr.read()
            return json.loads(line)

        assert ask(v1[3]) == [1, 40, 3]
        v2 = unit(2, 60)  # crosses exact_threshold: the new version is HNSW
        publish(tmp_path, np.arange(1000, 1060), v2, delete=np.arange(10))
        assert ask(v2[7]) == [2, 90, 1007]
        assert ask(v1[3])[2] != 3  # deleted in version 2
        publish(tmp_path, np.arange(5000, 5001), unit(3, 1))
        assert ask(v1[20]) == [3, 91, 20]
    finally:
        reader.stdin.close()
        reader.wait(timeout=30)
    assert reader.returncode == 0, reader.stderr.read()


CRASHING_WRITER = """
    import sys, time
    import numpy as np
    import ingestion.index as ix
    def stall(*args, **kwargs):  # the version files are written and fsynced; now wait to be killed
        print("READY", flush=True)
        time.sleep(120)
    setattr(ix, sys.argv[2], stall)
    x = np.random.default_rng(9).standard_normal((30, 16)).astype(np.float32)
    w = ix.IndexWriter(sys.argv[1], dim=16, exact_threshold=50)
    w.delete(np.arange(40))
    w.upsert(np.arange(900, 930), x, ["crashed version"] * 30)
    w.publish()
    print("NOT KILLED", flush=True)
"""


@pytest.mark.parametrize("stage", ["_install_version", "_point_current"])  # before rename / before CURRENT swap
def test_sigkill_mid_publish_leaves_last_good_version(tmp_path: Path, stage: str) -> None:
    v1 = unit(1, 40)
    publish(tmp_path, np.arange(40), v1)
    live_reader = IndexReader(tmp_path)
    assert live_reader.count == 40
    writer = python(CRASHING_WRITER, str(tmp_path), stage)
    try:
        assert writer.stdout.readline().strip() == "READY", writer.stderr.read()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith((".tmp-", "v00000002"))]
    assert leftovers  # the half-published version is on disk ...
    for r in (live_reader, IndexReader(tmp_path)):  # ... but nobody reads it
        assert (r.version, r.count) == (1, 40)
        assert r.dense(v1[5], 1)[0][0] == 5 and r.bm25("crashed", 5) == []
    # The kernel dropped the dead writer's lock: a new writer cleans up and publishes.
    with IndexWriter.open(tmp_path, dim=DIM, exact_threshold=50) as w:
        assert w.count == 40
        w.upsert(np.array([77]), unit(5, 1), ["after the crash"])
        assert w.publish() == 2
    assert not list(tmp_path.glob(".tmp-*"))
    assert (live_reader.version, live_reader.count) == (2, 41)
    assert live_reader.bm25("crash", 5)[0][0] == 77


WRITER = """
    import sys, time
    import numpy as np
    from ingestion.index import IndexWriter
    index_dir, log, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = np.random.default_rng(me).standard_normal((5, 16)).astype(np.float32)
    with IndexWriter.open(index_dir, dim=16, lock_timeout=60) as w:
        with open(log, "a") as f:
            f.write(f"start {me}\\n"); f.flush()
        ids = np.arange(5) + 100 * me
        w.upsert(ids, x, [f"writer {me}"] * 5)
        time.sleep(0.3)  # widen the window in which another writer could interleave
        v = w.publish()
        with open(log, "a") as f:
            f.write(f"end {me} {v}\\n"); f.flush()
"""


def test_writer_processes_never_interleave(tmp_path: Path) -> None:
    index_dir, log = tmp_path / "index", tmp_path / "log"
    procs = [python(WRITER, str(index_dir), str(log), str(me)) for me in range(1, 5)]
    for p in procs:
        p.stdin.close()
        assert p.wait(timeout=120) == 0, p.stderr.read()
    lines = [line.split() for line in log.read_text().splitlines()]
    assert len(lines) == 8
    versions = []
    for start, end in zip(lines[::2], lines[1::2]):  # each writer's start is followed by its own end
        assert start[0] == "start" and end[0] == "end" and start[1] == end[1], lines
        versions.append(int(end[2]))
    assert versions == [1, 2, 3, 4]
    r = IndexReader(index_dir)
    assert r.count == 20  # every writer's ids survived the others
    assert {i // 100 for i, _ in r.bm25("writer", 50)} == {1, 2, 3, 4}


HOLDER = """
    import sys
    from ingestion.index import IndexWriter
    w = IndexWriter(sys.argv[1], dim=16)
    print("HOLDING", flush=True)
    sys.stdin.readline()
    w.close()
    print("RELEASED", flush=True)
"""


def test_lock_held_by_another_process_refuses_a_second_writer(tmp_path: Path) -> None:
    holder = python(HOLDER, str(tmp_path))
    try:
        assert holder.stdout.readline().strip() == "HOLDING", holder.stderr.read()
        from ingestion.index import IndexLockedError

        with pytest.raises(IndexLockedError, match=rf"pid {holder.pid}"):
            IndexWriter(tmp_path, dim=DIM, lock_timeout=0.2)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "RELEASED"
        with IndexWriter.open(tmp_path, dim=DIM) as w:
            assert w.version == 0
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
