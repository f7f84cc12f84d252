"""Engine throughput: 1 stream vs N concurrent streams (continuous batching) on the default generator (SmolLM2 GGUF).

Each stream is a chat request (greedy, max_new_tokens). tokens/s = generated tokens of all streams / wall time from
the first submit to the last token, the same definition for both figures: "one stream at a time" runs the N requests
one after another (tokens and seconds summed over the N runs), "N concurrent streams" submits all N at once.
Prefill is included in both.
Run:  .venv/bin/python benchmarks/engine_streams.py [--streams 8] [--max-new-tokens 64] [--threads 1] [--ab --rounds 3]
--ab: also measures the Engine with the former one-prompt-at-a-time prefill (prefill="single") on the same weights,
alternating old/new in each round (best round of each reported), so the comparison is made under the same load.
Saves benchmarks/results/engine_streams.json (one entry per --quantization).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "engine_streams.json"
QUESTIONS = [
    "Explain what free cash flow tells an investor.",
    "Write a short paragraph about risks in a bank's loan book.",
    "Describe how rising interest rates affect bond prices.",
    "Summarise the purpose of an income statement.",
    "What should an analyst check in a company's 10-Q filing?",
    "Explain the difference between gross margin and operating margin.",
    "Describe three ways a retailer can grow same-store sales.",
    "Why do companies buy back their own shares?",
]


def run_streams(eng, questions: list[str], max_new_tokens: int) -> dict:
    """Submit all questions at once; wall time until all are done, tokens, time to first piece per stream."""
    first: list[float] = [0.0] * len(questions)
    t0 = time.perf_counter()
    reqs = [eng.submit(messages=[{"role": "user", "content": q}], max_new_tokens=max_new_tokens) for q in questions]

    def consume(i: int) -> None:
        for _ in reqs[i]:
            if not first[i]:
                first[i] = time.perf_counter() - t0

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(reqs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    tokens = sum(r.n_tokens for r in reqs)
    return {"streams": len(questions), "tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall,
            "texts": [r.text for r in reqs],
            "mean_time_to_first_piece_s": sum(first) / len(first), "finish_reasons": [r.finish_reason for r in reqs]}


def measure(eng, questions: list[str], max_new_tokens: int) -> dict:
    """One stream at a time over all questions, then all at once; the speedup of the second over the first."""
    one = [run_streams(eng, [q], max_new_tokens) for q in questions]  # one stream at a time
    single = {"tokens": sum(r["tokens"] for r in one), "seconds": sum(r["seconds"] for r in one)}
    single["tokens_per_s"] = single["tokens"] / single["seconds"]
    single["mean_time_to_first_piece_s"] = sum(r["mean_time_to_first_piece_s"] for r in one) / len(one)
    # the Engine's prefix store now holds the last question; a chat request on another subject leaves it holding
    # only what the N questions share with any chat request (the template's system prompt), as in steady serving
    eng.generate([{"role": "user", "content": "Good morning."}], max_new_tokens=1)
    many = run_streams(eng, questions, max_new_tokens)
    # greedy: a stream's text should not depend on batching; batched int4 matmuls round differently from one row,
    # so a near-tie late in a text can flip (the count shows how often)
    many["texts_same_as_one_at_a_time"] = sum(a == b for a, b in zip(many.pop("texts"), [r.pop("texts")[0] for r in one]))
    return {"one_stream_at_a_time": single, f"{len(questions)}_concurrent_streams": many,
            "speedup_concurrent_vs_one": many["tokens_per_s"] / single["tokens_per_s"]}


def show(label: str, m: dict, streams: int) -> None:
    single, many = m["one_stream_at_a_time"], m[f"{streams}_concurrent_streams"]
    print(f"{label}1 stream:   {single['tokens_per_s']:.1f} tok/s (first piece {single['mean_time_to_first_piece_s']:.2f} s)")
    print(f"{label}{streams} streams: {many['tokens_per_s']:.1f} tok/s (first piece {many['mean_time_to_first_piece_s']:.2f} s)"
          f"  -> {m['speedup_concurrent_vs_one']:.2f}x; same texts: {many['texts_same_as_one_at_a_time']}/{streams}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quantization", default=None, choices=[None, "int8", "int4"])
    ap.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"],
                    help="activation dtype (default: the checkpoint's own; the portal uses bfloat16 on CPUs with bf16 units)")
    ap.add_argument("--ab", action="store_true", help="also measure the former per-prompt prefill, alternating")
    ap.add_argument("--rounds", type=int, default=1, help="measurement rounds (best of each Engine is kept)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from modelcore.engine import Engine

    t0 = time.perf_counter()
    eng = Engine.get(quantization=a.quantization, max_batch=a.streams, max_len=1024, dtype=a.dtype)
    load_s = time.perf_counter() - t0
    engines = {"batched": eng}
    if a.ab:
        engines["single"] = Engine(eng.model, eng.tokenizer, max_batch=a.streams, max_len=1024, name="single-prefill",
                                   prefill="single")
    questions = (QUESTIONS * ((a.streams + len(QUESTIONS) - 1) // len(QUESTIONS)))[: a.streams]
    for e in engines.values():
        e.generate(questions[0], max_new_tokens=4)  # warm-up
    rounds: dict[str, list[dict]] = {k: [] for k in engines}
    for r in range(a.rounds):
        for k in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            m = measure(engines[k], questions, a.max_new_tokens)
            rounds[k].append(m)
            show(f"[round {r + 1}, prefill={k}] ", m, a.streams)
    key = f"{a.streams}_concurrent_streams"
    best = {k: max(v, key=lambda m: m[key]["tokens_per_s"]) for k, v in rounds.items()}
    result = {
        "what": f"Engine tokens/s, SmolLM2-135M-Instruct (GGUF Q4_1, quantization={a.quantization}, dtype={eng.model.dtype}), greedy chat requests",
        "tokens_per_s": "generated tokens of all streams / wall seconds from first submit to last token (prefill included)",
        "threads": a.threads, "max_new_tokens": a.max_new_tokens, "load_seconds": load_s, "rounds": a.rounds,
        **best["batched"],
        "load_average_1m_at_end": os.getloadavg()[0], "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "command": "python benchmarks/engine_streams.py " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in vars(a).items() if v not in (None, False)),
    }
    if a.ab:
        result["former_single_prefill"] = best["single"]
    for k, m in best.items():
        show(f"best, prefill={k}: ", m, a.streams)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(RESULTS.read_text()).get("runs", {}) if RESULTS.is_file() else {}
    runs[f"quantization={a.quantization or 'none'}" + (f",dtype={a.dtype}" if a.dtype else "")
         + (f",threads={a.threads}" if a.threads != 1 else "")] = result  # one entry per configuration, latest run wins
    RESULTS.write_text(json.dumps({"runs": runs}, indent=2))
    print(f"saved {RESULTS}")
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
