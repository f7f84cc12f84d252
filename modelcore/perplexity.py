"""Perplexity of a GGUF model loaded in float, int8 and int4 on ~20k tokens of TAT-QA report paragraphs.

    python -m modelcore.perplexity [--model PATH.gguf] [--tokens 20480] [--window 512] \
        [--out benchmarks/results/perplexity.json]

Text: the paragraphs of /work/shared/eval/tatqa (English financial-report prose), joined with blank lines,
tokenized once and cut into non-overlapping windows of `--window` tokens; each window is scored on its
own (no context across windows). "float" is the GGUF file dequantized to float32.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch

from .auto import AutoModel
from .defaults import default_generator_path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
MODES: dict[str, dict] = {
    "float": {"quantization": None},
    "int8": {"quantization": "int8"},
    "int4": {"quantization": "int4"},  # Q4_1 codes taken directly (group 32)
    "int8_fallback": {"quantization": "int8", "kernel": "fallback"},  # int8 weights, float32 activations (no bf16 kernel)
    "int4_fallback": {"quantization": "int4", "kernel": "fallback"},
    "int4_g64": {"quantization": "int4", "group_size": 64},  # re-quantized from the float weights
    "int4_g128": {"quantization": "int4", "group_size": 128},
    "int4_emb4": {"quantization": "int4", "embeddings": "int4"},  # + the tied embedding/head int4 (group 32, refined)
    "int4_emb4_gptq": {"quantization": "int4", "embeddings": "int4", "calibrate": True},  # same, head by GPTQ
    "int4_g64_emb4_gptq": {"quantization": "int4", "group_size": 64, "embeddings": "int4", "calibrate": True},  # 0.288x
}
CALIBRATION_TOKENS = 4096


def calibration_text(*, shared: Path = SHARED) -> str:
    """Text for GPTQ calibration, NOT the evaluation text: the visible text of the 10-K filing in corpus/long."""
    html = (shared / "corpus" / "long" / "example-10k.html").read_text(encoding="utf-8", errors="ignore")
    html = re.sub(r"(?is)<(script|style)\b.*?</\1>", " ", html)
    text = re.sub(r"&[#a-z0-9]+;", " ", re.sub(r"<[^>]+>", " ", html))
    return re.sub(r"\s+", " ", text).strip()


def calibration_ids(tokenizer, n: int = CALIBRATION_TOKENS) -> torch.Tensor:
    """n token ids from a third of the way into calibration_text() (past the filing's cover pages)."""
    ids = tokenizer.encode(calibration_text(), add_special_tokens=False)
    start = len(ids) // 3
    return torch.tensor(ids[start:start + n])


def corpus_text(*, shared: Path = SHARED) -> str:
    """TAT-QA dev paragraphs, in file order."""
    docs = json.loads((shared / "eval" / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
    return "\n\n".join(p["text"] for d in docs for p in d["paragraphs"])


@torch.no_grad()
def perplexity(*, model, ids: torch.Tensor, window: int, batch: int = 4) -> tuple[float, int]:
    """exp(mean next-token NLL) over non-overlapping windows of `ids` (1-D); returns (ppl, tokens scored)."""
    n_win = ids.numel() // window
    wins = ids[: n_win * window].view(n_win, window)  # (W, T)
    nll, count = 0.0, 0
    for i in range(0, n_win, batch):
        x = wins[i:i + batch]
        logits = model(x).logits.float()  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    return math.exp(nll / count), count


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m modelcore.perplexity", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "perplexity.json"))
    ap.add_argument("--update", action="store_true", help="merge these modes into an existing --out file (same text and window)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = Path(a.model) if a.model else default_generator_path()
    results: dict[str, dict] = {}
    ids = None
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        kw = dict(MODES[mode])
        if kw.pop("calibrate", False):
            from .tokenizer import AutoTokenizer

            kw["head_calibration"] = calibration_ids(AutoTokenizer.from_pretrained(path))
        model = AutoModel.from_pretrained(path, device_map="cpu", **kw)
        if ids is None:
            ids = torch.tensor(model.tokenizer.encode(corpus_text(), add_special_tokens=False)[: a.tokens])
        t1 = time.perf_counter()
        ppl, n = perplexity(model=model, ids=ids, window=a.window)
        results[mode] = {"ppl": round(ppl, 4), "tokens_scored": n, "load_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2)}
        print(f"{mode:10s} ppl={ppl:.4f} tokens={n} eval={results[mode]['eval_s']}s", flush=True)
        del model
    commands = ["python -m modelcore.perplexity " + " ".join(argv if argv is not None else sys.argv[1:])]
    if a.update and Path(a.out).is_file():
        prev = json.loads(Path(a.out).read_text(encoding="utf-8"))
        assert (prev["tokens"], prev["window"]) == (int(ids.numel()), a.window), "--update needs the same tokens and window"
        results = prev["results"] | results
        commands = prev.get("commands", [prev.get("command")]) + commands
    base = results.get("float", {}).get("ppl")
    if base:
        for r in results.values():
            r["delta_vs_float_pct"] = round(100 * (r["ppl"] / base - 1), 3)
    out = {
        "model": str(path.name), "text": "tatqa dev paragraphs", "tokens": int(ids.numel()) if ids is not None else 0,
        "window": a.window, "threads": a.threads, "torch": torch.__version__,
        "commands": commands, "results": results,
        "notes": "float = Q4_1 GGUF dequantized to float32; int8/int4 run the packed aten kernels (bfloat16 activations, "
                 "bfloat16-exact scales); *_fallback = dequantize + float32 matmul; int4 = Q4_1 codes taken directly "
                 "(group 32), embeddings and the tied head int8; int4_emb4 = the same with the tied embedding/head int4 too; "
                 "int4_emb4_gptq = the tied matrix int4 by GPTQ, calibrated on 4,096 tokens of corpus/long/example-10k.html",
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
