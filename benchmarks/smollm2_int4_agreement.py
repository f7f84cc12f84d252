"""How closely SmolLM2 loaded as int4 (Q4_1 codes taken directly) / int8 follows the float load.

    python benchmarks/smollm2_int4_agreement.py [--tokens 32] [--modes int4,int8,int4_emb4,int4_emb4_gptq] [--update] \
        [--out benchmarks/results/smollm2_int4_agreement.json]

Modes: int4 (Q4_1 codes kept, embeddings and tied head int8), int8, int4_emb4 (int4 with the tied embedding and
head int4 too, group 32: the setting that brings resident weights from 0.35x to 0.31x of bf16), int4_emb4_gptq
(the same, the tied matrix quantized by GPTQ calibrated on 4,096 tokens of a 10-K filing).

For 5 chat prompts (English and Chinese, the parity test's): greedy continuations of the float model, then
with teacher forcing on those continuations the top-1 agreement and logit cosine of each quantized model,
and the quantized model's own greedy continuation (exact match, length of the common prefix).
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

from modelcore.auto import AutoModel  # noqa: E402
from modelcore.defaults import default_generator_path  # noqa: E402
from modelcore.generate import decode_one_token, prefill  # noqa: E402
from modelcore.perplexity import calibration_ids  # noqa: E402
from modelcore.quant import quantized_nbytes  # noqa: E402

PROMPTS = [
    "What drove the increase in operating margin in fiscal 2019?",
    "Explain the difference between revenue and net income in two sentences.",
    "List three risks an investor should check in an annual report.",
    "请用一句话解释什么是市盈率。",
    "公司的营业收入增长了百分之十二，主要原因是什么？",
]


@torch.inference_mode()
def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    cache = model.new_cache(1, ids.shape[1] + n)
    logits, pos = prefill(model, ids, torch.ones_like(ids), cache)
    out: list[int] = []
    for _ in range(n):
        tok = logits.argmax(-1)
        out.append(int(tok))
        logits = decode_one_token(model, tok, pos, cache)
        pos = pos + 1
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="int4,int8,int4_emb4,int4_emb4_gptq")
    ap.add_argument("--update", action="store_true", help="merge these modes into an existing --out file")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "smollm2_int4_agreement.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    path = default_generator_path()
    ref = AutoModel.from_pretrained(path, device_map="cpu")
    tok = ref.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt") for p in PROMPTS]
    conts = [greedy(ref, ids, a.tokens) for ids in prompts]
    results: dict[str, dict] = {}
    for mode in a.modes.split(","):
        t0 = time.perf_counter()
        kw = {"quantization": "int4", "embeddings": "int4"} if mode.startswith("int4_emb4") else {"quantization": mode}
        if mode == "int4_emb4_gptq":  # GPTQ on 4,096 tokens of a 10-K filing (not these prompts)
            kw["head_calibration"] = calibration_ids(tok)
        q = AutoModel.from_pretrained(path, device_map="cpu", **kw)
        per_prompt = []
        agree = total = 0
        cos_sum = 0.0
        with torch.inference_mode():
            for p, ids, cont in zip(PROMPTS, prompts, conts):
                full = torch.cat([ids, torch.tensor([cont])], dim=1)
                la = ref(full).logits[0, ids.shape[1] - 1:-1].float()
                lb = q(full).logits[0, ids.shape[1] - 1:-1].float()
                hit = int((la.argmax(-1) == lb.argmax(-1)).sum())
                cos = torch.nn.functional.cosine_similarity(la, lb, dim=-1)
                own = greedy(q, ids, a.tokens)
                prefix = next((i for i, (x, y) in enumerate(zip(own, cont)) if x != y), len(cont))
                agree, total, cos_sum = agree + hit, total + len(cont), cos_sum + float(cos.sum())
                per_prompt.append({"prompt": p, "teacher_forced_top1": round(hit / len(cont), 4), "cos_min": round(float(cos.min()), 5),
                                   "greedy_exact": own == cont, "greedy_common_prefix": prefix,
                                   "float_text": tok.decode(cont), "quant_text": tok.decode(own)})
        results[mode] = {"weights_mib": round(quantized_nbytes(q) / 2**20, 1), "teacher_forced_top1": round(agree / total, 4), "logits_cos_mean": round(cos_sum / total, 5),
                         "greedy_exact_prompts": sum(r["greedy_exact"] for r in per_prompt),
                         "greedy_common_prefix_mean": sum(r["greedy_common_prefix"] for r in per_prompt) / len(per_prompt),
                         "seconds": round(time.perf_counter() - t0, 1), "per_prompt": per_prompt}
        print(mode, {k: v for k, v in results[mode].items() if k != "per_prompt"}, flush=True)
    if a.update and Path(a.out).is_file():
        results = json.loads(Path(a.out).read_text(encoding="utf-8"))["results"] | results
    out = {"model": path.name, "new_tokens": a.tokens, "reference": "same GGUF loaded in float32",
           "command": "python benchmarks/smollm2_int4_agreement.py " + " ".join(argv or sys.argv[1:]), "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2, ensure_ascii=False), encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
