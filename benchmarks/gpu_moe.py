"""Decode throughput of a DeepSeek-V2-Lite-shaped model (MLA + DeepSeekMoE, random bf16 weights): modelcore vs transformers.

Builds the 15.7B-parameter model straight on the GPU (nothing is saved to disk), prefills a random prompt and
times greedy decode steps at each batch size, for:

* ours_eager_sorted  - modelcore's default dispatch (sort tokens by expert, one matmul chain per hit expert)
* ours_eager_grouped - modelcore with packed experts and torch's grouped GEMM (no host synchronisation)
* ours_graph_grouped - the same decode step captured once in a CUDA graph and replayed
* ours_graph_gemv    - as ours_graph_grouped, but few-token steps use the Triton GEMV kernels (modelcore/moe_kernels.py)
* ours_compiled_graph_{grouped,gemv} - each Block through torch.compile (Inductor fuses the small ops), then captured
* hf_default         - transformers' DeepseekV2ForCausalLM with its default attention/experts implementation
* ours_product_generate (--product-only) - plain model.generate: modelcore's own CUDA path (packed experts, GEMV for
                       few tokens, compiled blocks, CUDA graph), no benchmark-side machinery

Before timing it checks the grouped dispatch against the sorted one and the graph replay against the eager step.
Prints a table and writes JSON (default benchmarks/results/gpu_moe.json).

    python benchmarks/gpu_moe.py                      # on a CUDA machine (H200: about 3 minutes)
    python benchmarks/gpu_moe.py --tiny --device cpu  # smoke test of the script itself, tiny shapes
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelcore.loading import config_to_args  # noqa: E402
from modelcore.model import Transformer  # noqa: E402
from modelcore.moe import MoE  # noqa: E402

# DeepSeek-V2-Lite's config.json shape (deepseek-ai/DeepSeek-V2-Lite): 15.7B parameters, 2.4B active per token.
V2_LITE: dict[str, Any] = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
    num_experts_per_tok=6, routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
    v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1, first_k_dense_replace=1,
    norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=100000, eos_token_id=100001,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
)
TINY = {**V2_LITE, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 16,
        "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16, "bos_token_id": 0,
        "eos_token_id": 1}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def init_random_(model: torch.nn.Module, seed: int) -> None:
    """Normal(0, 0.02) weights (as transformers initialises), norm weights 1."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)


def build_ours(cfg: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Transformer:
    """modelcore Transformer with random weights, allocated directly on `device`."""
    args = config_to_args(cfg)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(args)
    finally:
        torch.set_default_dtype(old)
    init_random_(model, 0)
    for m in model.modules():  # RoPE tables live on the CPU by design; keep a device copy (CUDA-graph safe)
        if hasattr(m, "inv_freq") and isinstance(m.inv_freq, torch.Tensor):
            m.inv_freq = m.inv_freq.to(device)
    return model.eval().requires_grad_(False)


class DecodeStep:
    """One greedy decode step over a fixed-size latent cache: static shapes, no host sync (graph-capturable)."""

    def __init__(self, model: Transformer, batch: int, max_len: int, compiled: bool = False):
        self.model, self.max_len = model, max_len
        # compiled: each Block through torch.compile; the MoE blocks share one compiled graph (same code, same shapes)
        self.raw_layers = list(model.model.layers)
        self.layers = [torch.compile(layer, dynamic=False) for layer in self.raw_layers] if compiled else self.raw_layers
        self.cache = model.new_cache(batch, max_len)
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.pos = torch.zeros(batch, 1, dtype=torch.long, device=model.device)
        self.keys = torch.arange(max_len, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    def prefill(self, ids: torch.Tensor) -> None:
        with torch.no_grad():
            logits = self.model(ids, cache=self.cache, last_only=True).logits  # (B, 1, V)
        self.reset(logits[:, -1].argmax(-1), ids.shape[1])

    def reset(self, tokens: torch.Tensor, pos: int) -> None:
        self.tokens.copy_(tokens.view(-1, 1))
        self.pos.fill_(pos)

    def _body(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) of the next token; writes this token's latent into the cache."""
        m = self.model.model
        mask = self.keys[None, None, None, :] <= pos[:, None, :, None]  # (B, 1, 1, L)
        h = m.embed_tokens(tokens)  # (B, 1, D)
        for i, layer in enumerate(self.layers):
            h = layer(h, pos, self.cache[i], mask)
        return self.model.lm_head(m.norm(h))[:, -1]  # (B, V)

    def step(self) -> torch.Tensor:
        with torch.no_grad():
            logits = self._body(self.tokens, self.pos)
            self.tokens.copy_(logits.argmax(-1, keepdim=True))
            self.pos.add_(1)
        return logits

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):  # also triggers torch.compile's compilation
                self.step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step()

    def run(self) -> torch.Tensor:
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self.step()


def time_product(model: Transformer, *, batch: int, prompt: int, new: int, seed: int) -> dict[str, Any]:
    """Decode tok/s through the product path, model.generate (on CUDA: packed experts, compiled blocks, CUDA graph
    replay per token, all inside modelcore.generate); decode time = generate(new + 1) - generate(1)."""
    for m in model.modules():  # undo use_dispatch's benchmark-only switches: the product defaults
        if isinstance(m, MoE):
            m.packed = getattr(m, "_pack_store", m.packed)
            m.gemv_max_pairs = 16
    device = model.device
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    gen = lambda n: model.generate(input_ids=ids, max_new_tokens=n, eos_token_id=[])  # noqa: E731

    def timed(n: int) -> float:
        sync(device)
        t = time.perf_counter()
        gen(n)
        sync(device)
        return time.perf_counter() - t

    first = timed(new + 1)  # compile + capture, once per shape
    t1 = min(timed(1) for _ in range(3))
    tn = min(timed(new + 1) for _ in range(2))
    return {"batch": batch, "new_tokens": new, "ms_per_step": 1000 * (tn - t1) / new, "tok_per_s": batch * new / (tn - t1),
            "first_call_seconds": first, "graphs": bool(model.__dict__.get("_graph_decoders")),
            "compiled": model.__dict__.get("_compiled_blocks") is not None}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def use_dispatch(model: Transformer, mode: str) -> None:
    """Every MoE on one path: "sorted" (per-expert loop), "grouped" (grouped GEMM), "gemv" (Triton GEMV for few tokens)."""
    for m in model.modules():
        if isinstance(m, MoE):
            if not hasattr(m, "_pack_store"):
                assert m.pack(), "experts are not plain Linears"
                m._pack_store = m.packed
            m.packed = None if mode == "sorted" else m._pack_store
            m.gemv_max_pairs = 16 if mode == "gemv" else 0


def time_ours(model: Transformer, *, batch: int, prompt: int, new: int, graph: bool, seed: int,
              compiled: bool = False) -> dict[str, Any]:
    device = model.device
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), device=device,
                        generator=torch.Generator(device=device).manual_seed(seed))
    dec = DecodeStep(model, batch, prompt + new + 8, compiled=compiled)
    dec.prefill(ids)
    first = dec.tokens.clone()
    t_cap = time.perf_counter()
    if graph:
        dec.capture()
    capture_s = time.perf_counter() - t_cap
    check: dict[str, float] = {}
    if graph:  # the replayed step against the plain eager step, from the same state
        dec.reset(first, prompt)
        replay = dec.run().clone()
        dec.reset(first, prompt)
        dec.layers, compiled_layers = dec.raw_layers, dec.layers
        eager = dec.step().clone()
        dec.layers = compiled_layers
        check = {"replay_vs_eager_rel_err": rel_err(replay, eager), "replay_finite": bool(replay.isfinite().all())}
    for _ in range(3):  # warm-up
        dec.run()
    dec.reset(first, prompt)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(new):
        dec.run()
    sync(device)
    dt = time.perf_counter() - t0
    return {"batch": batch, "new_tokens": new, "seconds": dt, "ms_per_step": 1000 * dt / new, "tok_per_s": batch * new / dt,
            "compile_and_capture_seconds": capture_s, **check}


def check_ours(model: Transformer, device: torch.device) -> dict[str, float]:
    """Grouped vs sorted dispatch on one MoE layer (32 tokens); CUDA-graph replay vs the eager step."""
    out: dict[str, float] = {}
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    x = torch.randn(1, 32, model.args.dim, device=device, dtype=model.dtype,
                    generator=torch.Generator(device=device).manual_seed(3))
    use_dispatch(model, "grouped")
    with torch.no_grad():
        grouped = moe(x) if moe._grouped_ok(x.view(-1, x.shape[-1])) else None
        use_dispatch(model, "sorted")
        sorted_ = moe(x)
        small = x[:, :2]  # 2 tokens x 6 experts = 12 pairs: the Triton GEMV path
        sorted_small = moe(small)
        use_dispatch(model, "gemv")
        gemv_small = moe(small) if moe.gemv is not None else None
    if grouped is not None:
        out["grouped_vs_sorted_rel_err"] = rel_err(grouped, sorted_)
    if gemv_small is not None:
        out["gemv_vs_sorted_rel_err"] = rel_err(gemv_small, sorted_small)
    if device.type == "cuda":
        use_dispatch(model, "grouped")
        ids = torch.randint(0, model.args.vocab_size, (4, 16), device=device)
        dec = DecodeStep(model, 4, 40)
        dec.prefill(ids)
        first = dec.tokens.clone()
        dec.capture()
        dec.reset(first, 16)
        eager = dec.step().clone()
        dec.reset(first, 16)
        eager2 = dec.step().clone()  # atomics in index_add_ make bf16 runs differ slightly: the noise floor
        dec.reset(first, 16)
        replay = dec.run().clone()
        out["eager_vs_eager_rel_err"] = rel_err(eager2, eager)
        out["graph_vs_eager_rel_err"] = rel_err(replay, eager)
        out["graph_logits_abs_max"] = float(replay.float().abs().max())
    return out


def profile_step(model: Transformer, *, batch: int, prompt: int, out: Path) -> None:
    """Kernel time table of 5 compiled decode steps (no graph, so each kernel is visible)."""
    from torch.profiler import ProfilerActivity, profile

    use_dispatch(model, "gemv")
    ids = torch.randint(0, model.args.vocab_size, (batch, prompt), device=model.device)
    dec = DecodeStep(model, batch, prompt + 40, compiled=True)
    dec.prefill(ids)
    for _ in range(4):
        dec.step()
    sync(model.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            dec.step()
        sync(model.device)
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.device_time for e in events) if events and hasattr(events[0], "device_time") else float("nan")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=90)
    text = f"kernels per step {len(events) / 5:.0f}, kernel time per step {total_us / 5 / 1000:.3f} ms\n{table}"
    out.write_text(text)
    print(text, flush=True)


def tune_gemv(model: Transformer) -> dict[str, Any]:
    """Time moe_gemv block sizes on one token (routed experts drawn at random per call, so L2 holds no weights)."""
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    use_dispatch(model, "gemv")
    if moe.gemv is None:
        return {"error": "Triton GEMV unavailable"}
    dev, k = model.device, moe.gate.top_k
    x = torch.randn(1, model.args.dim, device=dev, dtype=model.dtype)
    w = torch.rand(1, k, device=dev)
    idxs = [torch.randperm(moe.n_experts, device=dev)[:k][None] for _ in range(16)]
    table = []
    for block_n in (8, 16, 32, 64):
        for block_k in (128, 256, 512):
            for num_warps in (4, 8):
                opts = {"block_n": block_n, "block_k": block_k, "num_warps": num_warps}
                try:
                    for i in range(3):  # compile this config
                        moe.gemv(x, idxs[i], w, *moe.packed, **opts)
                    sync(dev)
                    graph = torch.cuda.CUDAGraph()  # replayed, so launch overhead stays out of the figure
                    with torch.cuda.graph(graph):
                        for i in range(16):
                            moe.gemv(x, idxs[i], w, *moe.packed, **opts)
                    graph.replay()
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(10):
                        graph.replay()
                    end.record()
                    sync(dev)
                    table.append({**opts, "us": 1000 * start.elapsed_time(end) / 160})
                except Exception as exc:  # a config Triton rejects
                    table.append({**opts, "error": str(exc)[:200]})
    ok = [r for r in table if "us" in r]
    best = min(ok, key=lambda r: r["us"])
    expert_bytes = 3 * moe.packed[1].shape[1] * moe.packed[1].shape[2] * 2 * k
    print(f"gemv tuning: best {best}, {expert_bytes / best['us'] / 1e3:.0f} GB/s of expert weights", flush=True)
    return {"best": best, "bytes_per_call": expert_bytes, "table": table}


def time_hf(cfg: dict[str, Any], *, device: torch.device, dtype: torch.dtype, batches: list[int], prompt: int, new: int,
            seed: int) -> dict[str, Any]:
    import transformers
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DynamicCache

    hf_cfg = DeepseekV2Config(**{k: v for k, v in cfg.items() if k != "model_type"})
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = DeepseekV2ForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(old)
    info: dict[str, Any] = {"transformers": transformers.__version__,
                            "attn_implementation": getattr(hf.config, "_attn_implementation", None),
                            "experts_implementation": getattr(hf.config, "_experts_implementation", None), "runs": []}
    for batch in batches:
        ids = torch.randint(0, cfg["vocab_size"], (batch, prompt), device=device,
                            generator=torch.Generator(device=device).manual_seed(seed))
        with torch.no_grad():
            for timed in (False, True):  # first pass warms up
                cache = DynamicCache(config=hf.config)
                nxt = hf(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                steps = new if timed else 3
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    nxt = hf(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                sync(device)
                dt = time.perf_counter() - t0
        info["runs"].append({"batch": batch, "new_tokens": new, "seconds": dt, "ms_per_step": 1000 * dt / new,
                             "tok_per_s": batch * new / dt})
        print(f"hf_default           batch {batch:3d}: {batch * new / dt:9.1f} tok/s  ({1000 * dt / new:.2f} ms/step)", flush=True)
    del hf
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test of this script)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile variant")
    ap.add_argument("--profile", action="store_true", help="only profile the compiled batch-1 decode step (kernel table)")
    ap.add_argument("--product-only", action="store_true", help="only time model.generate (the product path)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu_moe.json"))
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16
    cfg = TINY if a.tiny else V2_LITE
    result: dict[str, Any] = {"benchmark": "gpu_moe", "shape": "tiny" if a.tiny else "DeepSeek-V2-Lite", "config": cfg,
                              "dtype": str(dtype), "prompt_tokens": a.prompt, "torch": torch.__version__,
                              "python": platform.python_version(),
                              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                              "command": "python " + " ".join(sys.argv)}
    t0 = time.perf_counter()
    model = build_ours(cfg, device, dtype)
    sync(device)
    result["build_seconds_ours"] = time.perf_counter() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    cache = model.new_cache(1, 1)
    result["cache_values_per_token_per_layer"] = cache[0].kv.shape[-1]
    print(f"params {result['params'] / 1e9:.2f}B, built in {result['build_seconds_ours']:.1f}s, "
          f"cache {result['cache_values_per_token_per_layer']} values/token/layer", flush=True)
    variants = [("ours_eager_sorted", "sorted", False, False), ("ours_eager_grouped", "grouped", False, False),
                ("ours_graph_grouped", "grouped", True, False), ("ours_graph_gemv", "gemv", True, False),
                ("ours_compiled_graph_grouped", "grouped", True, True), ("ours_compiled_graph_gemv", "gemv", True, True)]
    if device.type != "cuda":
        variants = variants[:1]
    if a.skip_compile:
        variants = [v for v in variants if not v[3]]
    if a.profile:
        result["gemv_tuning"] = tune_gemv(model)
        for row in result["gemv_tuning"]["table"]:
            print(row)
        for m in model.modules():
            if isinstance(m, MoE):
                m.gemv_options = {key: result["gemv_tuning"]["best"][key] for key in ("block_n", "block_k", "num_warps")}
        profile_step(model, batch=a.batches[0], prompt=a.prompt, out=Path(a.out).with_suffix(".profile.txt"))
        return
    if a.product_only:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        runs = []
        for batch in a.batches:
            r = time_product(model, batch=batch, prompt=a.prompt, new=a.new, seed=1)
            print(f"ours_product_generate batch {batch:3d}: {r['tok_per_s']:9.1f} tok/s  ({r['ms_per_step']:.2f} ms/step), "
                  f"first call {r['first_call_seconds']:.1f} s", flush=True)
            runs.append(r)
            result["ours_product_generate"] = runs
            out.write_text(json.dumps(result, indent=2, default=str))
        return
    result["checks"] = check_ours(model, device)
    print("checks", result["checks"], flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str))

    if device.type == "cuda":
        result["gemv_tuning"] = tune_gemv(model)
        best = result["gemv_tuning"].get("best")
        if best:
            for m in model.modules():
                if isinstance(m, MoE):
                    m.gemv_options = {key: best[key] for key in ("block_n", "block_k", "num_warps")}
        save()
    for name, mode, graph, compiled in variants:
        if compiled and not a.skip_hf and "hf_default" not in result:  # transformers first: compiling may run long
            result["hf_default"] = time_hf(cfg, device=device, dtype=dtype, batches=a.batches, prompt=a.prompt, new=a.new,
                                           seed=1)
            gc.collect()
            torch.cuda.empty_cache()
            save()
        use_dispatch(model, mode)
        runs = []
        for batch in a.batches:
            try:
                r = time_ours(model, batch=batch, prompt=a.prompt, new=a.new, graph=graph, seed=1, compiled=compiled)
            except Exception as exc:  # report, keep the other figures
                print(f"{name} batch {batch}: FAILED {type(exc).__name__}: {str(exc)[:400]}", flush=True)
                runs.append({"batch": batch, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"})
                continue
            runs.append(r)
            print(f"{name:28s} batch {batch:3d}: {r['tok_per_s']:9.1f} tok/s  ({r['ms_per_step']:.2f} ms/step)", flush=True)
        result[name] = runs
        if device.type == "cuda":
            result["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        save()
    if not a.skip_hf and "hf_default" not in result:
        result["hf_default"] = time_hf(cfg, device=device, dtype=dtype, batches=a.batches, prompt=a.prompt, new=a.new, seed=1)
    save()
    print(f"saved {out}")


if __name__ == "__main__":
    main()
