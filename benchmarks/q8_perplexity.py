"""What the CUDA decode's int8 activations (triton_int4's q8 path) cost in perplexity, emulated on the CPU.

    .venv/bin/python benchmarks/q8_perplexity.py [--tokens 20480] [--out benchmarks/results/q8_perplexity.json]

On CUDA, one row fed by a norm reaches the qkv and gate/up int4 GEMVs as int8 codes per 32 columns (d = max|x| / 127,
rounded half up) instead of bf16. The q8 GEMV equals that maths up to its float32 sums and the bf16 output rounding
(tests/modelcore/test_cuda_decode.py, on an H200); this script puts the same maths (triton_int4.quantize_q8_reference)
in front of those linears of SmolLM2-135M-Instruct (the Q4_1 GGUF as int4 weights, dequantized float32 matmuls), and
scores modelcore.perplexity's text (TAT-QA dev paragraphs, 512-token windows) three ways: float32 activations, the
inputs of those linears rounded to bf16 (what the bf16 GEMV reads), and rounded to bf16 then to the q8 codes.
Windows are scored as prefills, every position's activations treated as the decode step treats its one row.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelcore import AutoModel, triton_int4  # noqa: E402
from modelcore.defaults import default_generator_path  # noqa: E402
from modelcore.perplexity import corpus_text, perplexity  # noqa: E402

TARGETS = ("qkv_proj", "gate_up_proj", "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # fused or not


def fake_q8(x: torch.Tensor) -> torch.Tensor:
    """x rounded to bf16, then to int8 codes per 32 columns, back in float32."""
    xb = x.to(torch.bfloat16)
    q, d, _ = triton_int4.quantize_q8_reference(xb)
    return (q.float().view(-1, 32) * d[:, None]).view(x.shape).to(x.dtype)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "q8_perplexity.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = default_generator_path()
    model = AutoModel.from_pretrained(path, device_map="cpu", quantization="int4", kernel="fallback")
    ids = torch.tensor(model.tokenizer.encode(corpus_text(), add_special_tokens=False)[: a.tokens])
    mods = [m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGETS]
    assert mods, "no qkv / gate-up linears found"
    results = {}
    for label, fn in (("float32", None), ("bf16", lambda x: x.to(torch.bfloat16).to(x.dtype)), ("q8", fake_q8)):
        hooks = [m.register_forward_pre_hook(lambda _m, args, fn=fn: (fn(args[0]),) + args[1:]) for m in mods] if fn else []
        t = time.perf_counter()
        ppl, n = perplexity(model=model, ids=ids, window=a.window)
        for h in hooks:
            h.remove()
        results[label] = {"ppl": round(ppl, 4), "tokens_scored": n, "eval_s": round(time.perf_counter() - t, 1)}
        print(label, results[label], flush=True)
    for r in results.values():
        r["delta_vs_bf16_pct"] = round(100 * (r["ppl"] / results["bf16"]["ppl"] - 1), 3)
    out = {"model": path.name, "weights": "int4 (Q4_1 codes, group 32), dequantized float32 matmuls",
           "linears_hooked": len(mods), "tokens": int(ids.numel()), "window": a.window, "threads": a.threads,
           "command": "python benchmarks/q8_perplexity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
