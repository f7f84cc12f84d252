"""Portal latency: time to first token of streamed answers with 20 concurrent users for 60 s on loopback.

Starts a live stack (fresh SQLite data folder, gunicorn with threads, one Celery worker on real Redis),
uploads a filing through the API, waits for it to be indexed, then N users each loop: POST /api/ask/
with stream=true and read the event stream. Time to first token = request start to the first `token`
event; total = to the `done` event; retrieval = the server-side time of the retrieve() call inside answering
(`retrieve_ms` of the `sources` event), per request.

    .venv/bin/python benchmarks/portal_latency.py [--users 20] [--seconds 60] [--no-model]
Saves benchmarks/results/portal_latency.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "portal"))
from live_stack import LiveStack  # noqa: E402  (the same stack the browser test runs)

FILING = ROOT.parent / "shared" / "corpus" / "financial" / "AMCOR_2022_8K_2022-07-01.pdf"
QUESTIONS = ["Who signed for Amcor as Company Secretary?", "What is Amcor's ticker symbol on the New York Stock Exchange?",
             "When was the original indenture dated?", "Which bank is the trustee under the indenture?",
             "What is the capital of France?"]
MAKE_USER = """
from django.contrib.auth.models import User
from knowledge.portal.services import token_create
print(token_create(user=User.objects.create_user("bench"))[1])
"""


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))], 3)


def ask(url: str, key: str, question: str) -> tuple[float | None, float, bool, float | None]:
    """(first token s, whole answer s, done seen, server-side retrieve() ms from the `sources` event)."""
    t0 = time.perf_counter()
    first = retrieve_ms = None
    ok = False
    event = ""
    with requests.post(url + "/api/ask/", json={"question": question, "stream": True}, stream=True, timeout=600,
                       headers={"Authorization": f"Bearer {key}"}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("event: "):
                event = line[len("event: "):].strip()
                if event == "token" and first is None:
                    first = time.perf_counter() - t0
                elif event == "done":
                    ok = True
            elif line.startswith("data: ") and event == "sources":
                retrieve_ms = json.loads(line[len("data: "):]).get("retrieve_ms")
    return first, time.perf_counter() - t0, ok, retrieve_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--no-model", action="store_true", help="extractive answers only (KD_ANSWER_WITH_MODEL off)")
    ap.add_argument("--out", help="JSON file (default: benchmarks/results/portal_latency[_extractive].json)")
    args = ap.parse_args()
    stack = LiveStack(Path(tempfile.mkdtemp(prefix="kd-latency-")))
    if args.no_model:
        stack.env["KD_ANSWER_WITH_MODEL"] = "0"
    stack.start()
    try:
        key = stack.manage("shell", "-c", MAKE_USER).strip().splitlines()[-1]
        auth = {"Authorization": f"Bearer {key}"}
        with FILING.open("rb") as f:
            doc = requests.post(stack.url + "/api/documents/", headers=auth, files={"file": f}, timeout=120).json()
        t0 = time.time()
        while (st := requests.get(f"{stack.url}/api/documents/{doc['id']}/", headers=auth, timeout=30).json())["status"] \
                not in ("indexed", "failed"):
            time.sleep(1)
        assert st["status"] == "indexed", st
        ingest_s = time.time() - t0
        ask(stack.url, key, QUESTIONS[0])  # warm up: loads the embedder and the model in the web process
        ttft, total, retrieval, errors, done = [], [], [], [], 0
        lock = threading.Lock()
        stop_at = time.time() + args.seconds

        def user(i: int) -> None:
            nonlocal done
            n = i
            while time.time() < stop_at:
                try:
                    first, t, ok, r_ms = ask(stack.url, key, QUESTIONS[n % len(QUESTIONS)])
                    with lock:
                        total.append(t)
                        done += ok
                        if first is not None:
                            ttft.append(first)
                        if r_ms is not None:
                            retrieval.append(r_ms)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with lock:
                        errors.append(repr(exc)[:200])
                n += 1

        threads = [threading.Thread(target=user, args=(i,)) for i in range(args.users)]
        t_start = time.time()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.time() - t_start
    finally:
        stack.stop()
    cpu = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    load = Path("/proc/loadavg").read_text().split()[:3]
    result = {
        "users": args.users, "seconds": args.seconds, "wall_s": round(wall, 1), "mode": "extractive" if args.no_model else "model",
        "answers_completed": done, "errors": len(errors), "error_samples": errors[:3],
        "ttft_s_p50": pct(ttft, 50), "ttft_s_p95": pct(ttft, 95), "total_s_p50": pct(total, 50), "total_s_p95": pct(total, 95),
        "retrieval_ms_p50": pct(retrieval, 50), "retrieval_ms_p95": pct(retrieval, 95), "retrieval_samples": len(retrieval),
        "retrieval_note": "server-side time of the retrieve() call inside answering (FAISS + BM25 + fusion, ACL "
                          "filter, chunk rows), per request, reported in the stream's `sources` event; goal p95 < 100 ms",
        "answers_per_s": round(done / wall, 3), "ingest_to_indexed_s": round(ingest_s, 1),
        "cpus": cpu, "loadavg_at_end": load,
        "command": "benchmarks/portal_latency.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=2))
    default = ROOT / "benchmarks" / "results" / ("portal_latency_extractive.json" if args.no_model else "portal_latency.json")
    out = Path(args.out) if args.out else default
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
