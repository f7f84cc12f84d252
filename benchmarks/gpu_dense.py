"""GPU decode benchmark on a DeepSeek-R1-Distill-Qwen-7B-shaped Qwen2 model with random weights: ours vs transformers.

    python benchmarks/gpu_dense.py [--layers 28] [--new 128] [--out benchmarks/results/gpu_dense.json]

Both models share the same random bf16 weights (built once, on the GPU, by transformers' Qwen2ForCausalLM and
assigned into modelcore's Transformer without a copy). Figures: decode tok/s at batch 1 and 32 (greedy, after
a 128-token prompt), time to first token for a 4096-token prompt, for transformers bf16 (`generate`, default
dynamic cache), ours bf16 and ours int4 (group 128, lm_head int4 too, embedding rows int4 group 128; CUDA int4 linears
in modelcore/triton_int4.py: a Triton GEMV for decode (one row: silu * up in the gate/up epilogue, residuals added in o
and down), dequantize + dense GEMM for longer inputs), ours through
`model.generate` (the product path: static KV cache, torch.compile'd blocks with the Triton decode attention of
modelcore/triton_attention.py, one CUDA graph replay per token; see modelcore/generate.py GraphDecoder; prefill with
the one-pass RoPE and silu * up kernels). Also checks one CUDA int4 linear (GEMV and dense path) against its dequantized
matmul, and the int4 model's graphed greedy decode (GEMV) against eager teacher-forced argmax (dense path), and records resident sizes (parameters + buffers) of bf16 and int4 with and without the int4 embedding/head.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelcore.args import ModelArgs  # noqa: E402
from modelcore.model import Transformer  # noqa: E402
from modelcore.quant import quantize_model  # noqa: E402

CFG = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
           vocab_size=152064, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r


def bench_ours(model: Transformer, *, prompt: int, new: int, ttft_len: int) -> dict:
    """Through the product path, model.generate: on CUDA it prefills eagerly (causal flash attention; int4 layers
    dequantized to bf16 for long prompts) and decodes by replaying a captured, torch.compile'd step over a static cache."""
    res: dict = {}
    dev = model.device
    gen = lambda ids, n: model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[])  # noqa: E731
    for b in (1, 32):
        ids = torch.randint(0, CFG["vocab_size"], (b, prompt), device=dev)
        res[f"first_call_b{b}_s"] = round(_timed(lambda: gen(ids, new + 1))[0], 2)  # compile + capture, once per shape
        t1 = min(_timed(lambda: gen(ids, 1))[0] for _ in range(3))
        tn = min(_timed(lambda: gen(ids, new + 1))[0] for _ in range(2))
        res[f"decode_b{b}_tok_s"] = round(b * new / (tn - t1), 1)
        torch.cuda.empty_cache()
    ids = torch.randint(0, CFG["vocab_size"], (1, ttft_len), device=dev)
    gen(ids, 1)
    res["ttft_4096_ms"] = round(1000 * min(_timed(lambda: gen(ids, 1))[0] for _ in range(3)), 1)
    return res


def int4_kernel_check() -> dict:
    """Is int4 drift a kernel bug? One int4 linear (7B qkv shape) on CUDA against the matmul with its own dequantized
    weight (GEMV: GEMV_MAX_ROWS rows; dense path: 512 rows), and the layout read back (the prefill path) against the
    quantizer."""
    from modelcore import triton_int4
    from modelcore.model import dequantize_cuda_int4, linear
    from modelcore.quant import Int4Linear, quantize_int4

    torch.manual_seed(1)
    n, k = 4608, 3584
    w = torch.randn(n, k, device="cuda") * 0.02
    qw = quantize_int4(w, group_size=128)
    lin = Int4Linear(qw, None)
    rows = triton_int4.GEMV_MAX_ROWS
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ qw.dequantize(torch.float32).T
    y = lin(x).float()
    deq = dequantize_cuda_int4(lin.packed, lin.scales_and_zeros, 128).float()
    xl = torch.randn(512, k, device="cuda", dtype=torch.bfloat16)
    cos = lambda a, b: round(float(F.cosine_similarity(a.float(), b.float(), dim=-1).min()), 6)  # noqa: E731
    return {"kernel_vs_dequantized_matmul_cos_min": cos(y, ref),
            "float_vs_dequantized_weight_cos_min": cos(x.float() @ w.T, ref),
            "layout_readback_max_abs_err": float((deq - qw.dequantize(torch.float32)).abs().max()),
            "dense_prefill_vs_gemv_cos_min": cos(linear(lin, xl)[:rows], lin(xl[:rows])),
            "q8_gemv_vs_dequantized_matmul_cos": cos(q8_row(lin, x[:1]), ref[:1]),
            "gemv_config_qkv": triton_int4.gemv_config(1, n, k),
            "q8_config_qkv": triton_int4.gemv_q8_config(n, k)}


def q8_row(lin, x: torch.Tensor) -> torch.Tensor:
    """One row through the q8 path as the decode step takes it: a norm of unit weight (it scales the row, which a
    cosine ignores) writes the int8 words, the q8 GEMV reads them. For int4_kernel_check."""
    from modelcore import triton_int4

    _, xq, st = triton_int4.rms_norm_q8(x, torch.ones(x.shape[1], device="cuda", dtype=torch.bfloat16), 1e-6)
    return triton_int4.gemv_q8(xq, st, lin.packed, lin.scales_and_zeros, 128).float()


def int4_model_checks(model: Transformer) -> dict:
    """The int4 model against itself through its other paths: greedy tokens of the graphed decode (int4 GEMV) vs the
    eager model's teacher-forced argmax on them (64+ rows: dequantized weights and dense GEMMs)."""
    ids = torch.randint(0, CFG["vocab_size"], (2, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(5))
    with torch.inference_mode():
        graphed = model.generate(input_ids=ids, max_new_tokens=24, eos_token_id=[])
        forced = model(graphed[:, :-1]).logits.float()[:, 63:]  # eager, teacher-forced on the graphed tokens
        top2 = forced.topk(2, dim=-1).values
    agree = forced.argmax(-1) == graphed[:, 64:]
    return {"graphed_greedy_vs_eager_teacher_forced_argmax_agreement": round(float(agree.float().mean()), 4),
            "median_top1_top2_logit_gap": round(float((top2[..., 0] - top2[..., 1]).median()), 4),
            "note": "random weights: near-tied logits, so argmax agreement < 1 between numerically different paths"}


def bench_hf(hf, *, prompt: int, new: int, ttft_len: int) -> dict:
    res: dict = {}
    dev = hf.device
    gen = lambda ids, n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,  # noqa: E731
                                     do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        for b in (1, 32):
            ids = torch.randint(0, CFG["vocab_size"], (b, prompt), device=dev)
            gen(ids, 4)
            t1, _ = _timed(lambda: gen(ids, 1))
            tn, _ = _timed(lambda: gen(ids, new + 1))
            res[f"decode_b{b}_tok_s"] = round(b * new / (tn - t1), 1)
        ids = torch.randint(0, CFG["vocab_size"], (1, ttft_len), device=dev)
        gen(ids, 1)
        res["ttft_4096_ms"] = round(1000 * min(_timed(lambda: gen(ids, 1))[0] for _ in range(3)), 1)
    return res


def _rope_theta(cfg) -> float:
    """transformers 5 keeps rope_theta inside rope_parameters; older versions as an attribute."""
    params = getattr(cfg, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(cfg, "rope_theta", None) or CFG["rope_theta"])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=CFG["num_hidden_layers"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--ttft-len", type=int, default=4096)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_dense.json"))
    ap.add_argument("--tuned", help="GEMV configs from a sweep's output (benchmarks/gpu_int4_decode.py --out), over "
                                    "modelcore.triton_int4.TUNED")
    a = ap.parse_args(argv)
    tuned = None
    if a.tuned:
        from modelcore import triton_int4

        tuned = {name: v["cfg"] for name, v in json.loads(Path(a.tuned).read_text())["best"].items()}
        for v in json.loads(Path(a.tuned).read_text())["best"].values():
            triton_int4.TUNED[(1, v["n"], v["k"], v["gated"])] = {kk: vv for kk, vv in v["cfg"].items() if kk != "MB"}
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**(CFG | {"num_hidden_layers": a.layers}))
    with torch.device("cuda"):
        hf = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    args = ModelArgs(model_type="qwen2", vocab_size=cfg.vocab_size, dim=cfg.hidden_size, n_layers=a.layers,
                     n_heads=cfg.num_attention_heads, n_kv_heads=cfg.num_key_value_heads, inter_dim=cfg.intermediate_size,
                     max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps, rope_theta=_rope_theta(cfg),
                     attention_bias=True, tie_word_embeddings=False, dtype="bfloat16")
    with torch.device("meta"):
        ours = Transformer(args)
    ours.load_state_dict(hf.state_dict(), strict=False, assign=True)
    ours.eval().requires_grad_(False)
    ours.fuse_projections()  # q/k/v and gate/up as one matmul each (before quantizing: CUDA int4 cannot be concatenated)
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": CFG | {"num_hidden_layers": a.layers},
                 "prompt": a.prompt, "new_tokens": a.new, "command": "python benchmarks/gpu_dense.py " + " ".join(argv or sys.argv[1:])}
    if tuned:
        out["gemv_configs_from_sweep"] = tuned
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")
        la, lb = ours(ids).logits.float(), hf(ids).logits.float()
        out["ours_vs_hf_logits_cos_min"] = round(float(F.cosine_similarity(la, lb, dim=-1).min()), 5)
    out["int4_kernel_check"] = int4_kernel_check()
    print("int4_kernel_check", out["int4_kernel_check"], flush=True)
    results = {}
    if not a.skip_hf:
        results["transformers_bf16"] = bench_hf(hf, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
        print("transformers_bf16", results["transformers_bf16"], flush=True)
    results["ours_bf16"] = bench_ours(ours, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
    print("ours_bf16", results["ours_bf16"], flush=True)
    bf16_bytes = torch.cuda.memory_allocated()
    del hf
    ours.__dict__.pop("_graph_decoders", None)
    ours.__dict__.pop("_compiled_blocks", None)
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    from modelcore.quant import quantized_nbytes

    bf16_model_bytes = quantized_nbytes(ours)
    head_bf16_bytes = ours.lm_head.weight.numel() * 2
    emb_bf16_bytes = ours.model.embed_tokens.weight.numel() * 2
    # int4 linears and head (group 128, modelcore/triton_int4.py layout), int4 embedding rows (group 128)
    quantize_model(ours, "int4", group_size=128, embeddings="int4", embedding_group_size=128)
    torch.cuda.empty_cache()
    int4_bytes = quantized_nbytes(ours)
    emb4_bytes = quantized_nbytes(ours.model.embed_tokens)
    head4_bytes = quantized_nbytes(ours.lm_head)
    sizes = {"bf16_gb": bf16_model_bytes / 1e9,
             "int4_all_gb": int4_bytes / 1e9,
             "int4_bf16_embedding_gb": (int4_bytes - emb4_bytes + emb_bf16_bytes) / 1e9,
             "int4_bf16_embedding_and_head_gb": (int4_bytes - emb4_bytes - head4_bytes + emb_bf16_bytes + head_bf16_bytes) / 1e9}
    out["resident_size"] = {k: round(v, 3) for k, v in sizes.items()} | {
        f"{k.removesuffix('_gb')}_vs_bf16": round(v / sizes["bf16_gb"], 4) for k, v in sizes.items() if k != "bf16_gb"} | {
        "note": "parameters + buffers (quant.quantized_nbytes), measured on the GPU; variants swap in the measured "
                "bf16 sizes of the embedding (152064x3584) and head"}
    print("resident_size", out["resident_size"], flush=True)
    with torch.inference_mode():
        lq = ours(ids).logits.float()
        out["int4_vs_bf16_logits_cos_mean"] = round(float(F.cosine_similarity(lq, la, dim=-1).mean()), 5)
    results["ours_int4_g128_emb4"] = bench_ours(ours, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
    print("ours_int4_g128_emb4", results["ours_int4_g128_emb4"], flush=True)
    out["int4_checks"] = int4_model_checks(ours)
    print("int4_checks", out["int4_checks"], flush=True)
    out["gpu_mem_bf16_both_models_gb"] = round(bf16_bytes / 2**30, 2)
    out["gpu_mem_int4_model_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    out["results"] = results
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
