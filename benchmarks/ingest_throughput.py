"""Ingestion throughput: the whole pipeline (partition, clean, chunk, embed, index) in one process.

Runs the same stage services a worker runs, one document after another, on a fresh data folder and
SQLite database, and prints pages/s and chunks/s per stage plus peak RSS. With ``--corpus all`` it
also checks that every corpus file outside bad/ ends indexed with chunks on valid pages and every
file in bad/ ends failed with a reason.

    .venv/bin/python benchmarks/ingest_throughput.py                 # corpus/financial
    .venv/bin/python benchmarks/ingest_throughput.py --corpus all    # every folder, with the checks
    .venv/bin/python benchmarks/ingest_throughput.py --corpus formats,multilingual,bad --out /tmp/check.json
    .venv/bin/python benchmarks/ingest_throughput.py --corpus long --until chunk --out /tmp/long.json  # no embedding
Figures go to benchmarks/results/ingest_throughput.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CORPUS = SHARED / "corpus"
FOLDERS = ("financial", "formats", "multilingual", "long", "bad")
# In bad/ but still readable: ingestion reads its slides (tests/ingestion/test_bad_input.py), so it is expected indexed.
READABLE_DESPITE_DAMAGE = {"fake-power-point-malformed.pptx"}


def setup(data_dir: Path) -> None:
    os.environ["KD_DATA_DIR"] = str(data_dir)
    os.environ["DATABASE_URL"] = f"sqlite:///{data_dir / 'db.sqlite3'}"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "knowledge.settings")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="financial", help=f"comma-separated folders of {', '.join(FOLDERS)}, or 'all'")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ingest_throughput.json"))
    parser.add_argument("--data-dir", help="keep the data folder here (default: a temp folder)")
    parser.add_argument("--until", default="index", choices=("chunk", "index"),
                        help="stop after this stage (chunk: check partition/clean/chunk of big files without embedding)")
    args = parser.parse_args()
    folders = FOLDERS if args.corpus == "all" else tuple(f.strip() for f in args.corpus.split(",") if f.strip())
    unknown = set(folders) - set(FOLDERS)
    if unknown:
        parser.error(f"unknown corpus folder(s): {', '.join(sorted(unknown))}")
    files = [(f, p) for f in folders for p in sorted((CORPUS / f).iterdir()) if p.is_file()]
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="kd-bench-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    setup(data_dir)

    from django.contrib.auth import get_user_model

    from knowledge.documents import services
    from knowledge.documents.models import Document, Status
    from knowledge.documents.pipeline import STAGES, embedder, worker_warm_up
    from knowledge.documents.runner import stage_fail

    # What every worker process does once at start (workers.py, worker_process_init), outside the timed run.
    warm_up_s = worker_warm_up()
    emb = embedder()
    owner = get_user_model().objects.create_superuser("bench", password="bench-password-1")
    stage_s: dict[str, float] = defaultdict(float)
    stage_cpu: dict[str, float] = defaultdict(float)  # this process's CPU seconds (all its threads): robust on a busy host
    per_doc, problems = [], []
    finished = Status.EMBEDDING if args.until == "chunk" else Status.INDEXED  # where a good document ends
    total_t = time.perf_counter()
    for folder, path in files:
        doc = services.document_accept(uploader=owner, path=path, filename=path.name, visibility="firm", enqueue=False).document
        times, cpu = {}, {}
        for stage, run in STAGES[: 3 if args.until == "chunk" else 5]:
            t, c = time.perf_counter(), time.process_time()
            try:
                run(document_id=doc.pk)
            except Exception as exc:  # noqa: BLE001 - recorded as the document's failure, like the worker does
                stage_fail(document_id=doc.pk, stage=stage, exc=exc)
            times[stage] = time.perf_counter() - t
            cpu[stage] = time.process_time() - c
            if Document.objects.filter(pk=doc.pk, status=Status.FAILED).exists():
                break
        doc.refresh_from_db()
        chunks = list(doc.chunks.values_list("page_start", "page_end"))
        ok_pages = all(1 <= (s or 0) <= (e or 0) <= max(doc.page_count, 1) for s, e in chunks)
        if doc.status == finished:  # only finished documents count towards throughput
            for stage, secs in times.items():
                stage_s[stage] += secs
                stage_cpu[stage] += cpu[stage]
        row = {"folder": folder, "file": path.name, "status": doc.status, "reason": doc.status_reason,
               "pages": doc.page_count, "chunks": len(chunks), "pages_valid": ok_pages,
               "seconds": {k: round(v, 3) for k, v in times.items()}}
        per_doc.append(row)
        want = Status.FAILED if folder == "bad" and path.name not in READABLE_DESPITE_DAMAGE else finished
        if doc.status != want or (want == finished and (not chunks or not ok_pages)) or (want == Status.FAILED and not doc.status_reason):
            problems.append(f"{folder}/{path.name}: {doc.status} {doc.status_reason[:120]}")
        print(f"{folder}/{path.name}: {doc.status} pages={doc.page_count} chunks={len(chunks)} "
              f"{sum(times.values()):.1f}s {doc.status_reason[:100]}", flush=True)
    wall = time.perf_counter() - total_t
    indexed = [r for r in per_doc if r["status"] == finished]
    pages = sum(r["pages"] for r in indexed)
    chunks = sum(r["chunks"] for r in indexed)
    busy = sum(stage_s.values())
    result = {
        "benchmark": "ingest_throughput",
        "command": "python benchmarks/ingest_throughput.py " + " ".join(sys.argv[1:]),
        "corpus": list(folders),
        "until": args.until,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": list(os.getloadavg())},
        "embedder": {"name": emb.name, "dim": emb.dim},
        "worker_start_s": {k: round(v, 2) for k, v in warm_up_s.items()},
        "documents": len(per_doc),
        "indexed": len(indexed),
        "failed": sum(r["status"] == Status.FAILED for r in per_doc),
        "pages_indexed": pages,
        "chunks_indexed": chunks,
        "wall_s": round(wall, 2),
        "pages_per_s": round(pages / busy, 3) if busy else None,
        "chunks_per_s": round(chunks / busy, 3) if busy else None,
        "stages": {s: {"seconds": round(v, 2), "pages_per_s": round(pages / v, 2) if v else None,
                       "chunks_per_s": round(chunks / v, 2) if v else None, "cpu_seconds": round(stage_cpu[s], 2)}
                   for s, v in stage_s.items()},
        "torch_threads": torch_threads(),
        "pages_per_cpu_s": round(pages / sum(stage_cpu.values()), 3) if stage_cpu else None,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "problems": problems,
        "expected_indexed_from_bad": sorted(READABLE_DESPITE_DAMAGE),
        "per_document": per_doc,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "per_document"}, indent=2))
    print(f"saved {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
