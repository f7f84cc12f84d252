"""Embedding throughput on ONE core: ours (float32, bfloat16) vs transformers, on real ~200-word chunks.

Chunks: consecutive 200-word windows of text extracted with pypdf from /work/shared/corpus/financial.
Also reports each variant's cosine to transformers' vectors (same mean pooling) and the rejected int8 path.
Run:  .venv/bin/python benchmarks/embed_speed.py [--chunks 96] [--threads 1]
Saves benchmarks/results/embed_speed.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
RESULTS = REPO / "benchmarks" / "results" / "embed_speed.json"


def real_chunks(n: int, words: int = 200) -> list[str]:
    """n consecutive `words`-word windows from the financial PDFs (first pages of each)."""
    from pypdf import PdfReader

    logging.getLogger("pypdf").setLevel(logging.ERROR)
    chunks: list[str] = []
    for pdf in sorted((SHARED / "corpus" / "financial").glob("*.pdf")):
        toks = " ".join((page.extract_text() or "") for page in PdfReader(pdf).pages[:12]).split()
        chunks += [" ".join(toks[i : i + words]) for i in range(0, len(toks) - words + 1, words)]
        if len(chunks) >= n:
            return chunks[:n]
    raise SystemExit(f"only {len(chunks)} chunks of {words} words found under {SHARED / 'corpus/financial'}")


def timed(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` runs after one warm-up run."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def transformers_embed(folder: str, max_tokens: int, batch_size: int):
    """Reference: transformers' AutoModel + mean pooling + L2 normalisation, batches in input order."""
    from transformers import AutoModel, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def run(texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            b = tok(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).float()
            out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy())
        return np.concatenate(out)

    return run


def int8_dynamic_cosine(texts: list[str], ref: np.ndarray) -> float:
    """Cosine of torch's dynamic int8 linear quantization to the float vectors (the accept/reject check)."""
    from modelcore.embed import load_embedder

    emb = load_embedder(dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        emb.model = torch.ao.quantization.quantize_dynamic(emb.model, {torch.nn.Linear}, dtype=torch.qint8)
    return float((emb.embed(texts) * ref).sum(1).min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from modelcore.defaults import default_encoder_path
    from modelcore.embed import load_embedder

    texts = real_chunks(a.chunks)
    f32 = load_embedder(dtype="float32")
    n_tokens = [min(f32.count_tokens(t) + 2, f32.max_tokens) for t in texts]
    ref_fn = transformers_embed(str(default_encoder_path()), f32.max_tokens, a.batch_size)
    t_ref, ref = timed(lambda: ref_fn(texts), a.repeats)
    rows = {"transformers_float32": {"seconds": t_ref, "chunks_per_s": len(texts) / t_ref, "min_cosine_vs_transformers": 1.0}}
    for dtype in ("float32", "bfloat16"):
        emb = f32 if dtype == "float32" else load_embedder(dtype=dtype)
        t, vecs = timed(lambda: emb.embed(texts, batch_size=a.batch_size), a.repeats)
        rows[f"ours_{dtype}"] = {"seconds": t, "chunks_per_s": len(texts) / t,
                                 "min_cosine_vs_transformers": float((vecs * ref).sum(1).min())}
    result = {
        "what": "chunks/s embedding ~200-word chunks of financial PDFs (pypdf text), all-MiniLM-L6-v2, mean pooling",
        "threads": a.threads, "batch_size": a.batch_size, "chunks": len(texts), "max_tokens": f32.max_tokens,
        "mean_tokens_per_chunk_after_truncation": float(np.mean(n_tokens)),
        "load_average_1m_at_start": os.getloadavg()[0], "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__, "results": rows,
        "speedup_ours_bfloat16_vs_transformers": rows["ours_bfloat16"]["chunks_per_s"] / rows["transformers_float32"]["chunks_per_s"],
        "speedup_ours_float32_vs_transformers": rows["ours_float32"]["chunks_per_s"] / rows["transformers_float32"]["chunks_per_s"],
        "int8_dynamic_min_cosine_vs_float": int8_dynamic_cosine(texts, ref),
        "command": "python benchmarks/embed_speed.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()),
    }
    for name, r in rows.items():
        print(f"{name:22s} {r['chunks_per_s']:7.2f} chunks/s   min cos {r['min_cosine_vs_transformers']:.6f}")
    print(f"int8 dynamic (rejected if < 0.995): min cos {result['int8_dynamic_min_cosine_vs_float']:.4f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"saved {RESULTS}")


if __name__ == "__main__":
    main()
