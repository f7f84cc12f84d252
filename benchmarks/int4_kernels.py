"""CUDA int4 kernels at the 7B Qwen2 shapes (group 128): our Triton GEMV and dequantizer (modelcore/triton_int4.py,
block-32 layout) swept over their launch parameters, against torch's tinygemm (inner_k_tiles 8) and bf16 F.linear;
then per-token matmul time of a whole decode step captured as one CUDA graph, and a 4096-token prefill's 28 layers
of linears, int4 (dequantize + GEMM) against bf16.

    python benchmarks/int4_kernels.py --out benchmarks/results/int4_kernels.json

Weights are random codes and scales (timing only); each kernel is also checked against the reference dequantized
matmul. Times: triton.testing.do_bench medians (L2 flushed before each run), in microseconds.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelcore import triton_int4 as ti  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944), "head": (152064, 3584)}
PER_TOKEN = {"qkv": 28, "o": 28, "gate_up": 28, "down": 28, "head": 1}
G = 128


def gemv_configs_m1() -> list[dict]:
    out = [dict(MB=1, BN=bn, BB=bb, PREFETCH=1, num_warps=nw, KS=ks)
           for bn, bb, nw, ks in itertools.product((8, 16, 32), (8, 16), (2, 4), (1, 2, 4)) if bn * bb >= 32 * nw]
    return out + [dict(MB=1, BN=bn, BB=16, PREFETCH=2, num_warps=4, KS=ks) for bn in (16, 32) for ks in (1, 2)]


def gemv_configs_mb(m: int) -> list[dict]:
    mb = 1 << (m - 1).bit_length()
    return [dict(MB=mb, BN=bn, BB=16, PREFETCH=1, num_warps=4, KS=ks) for bn in (16, 32) for ks in (1, 2)]


DEQUANT = [dict(bn=bn, bb=bb, num_warps=nw) for bn in (8, 16, 32) for bb in (4, 8, 16) for nw in (4, 8)]
MS = (2, 4, 8, 16, 32)


def _key(cfg: dict) -> str:
    return "_".join(f"{k}{int(v) if isinstance(v, bool) else v}" for k, v in cfg.items())


def _warm(jobs: list[tuple]) -> int:
    """Compile kernels into Triton's on-disk cache (a pool of processes: compiling is the slow part of the sweep)."""
    import torch

    from modelcore import triton_int4 as ti

    done = 0
    for kind, m, n, k, cfg in jobs:
        try:
            w = torch.zeros(8, dtype=torch.int32, device="cuda")
            x = torch.zeros(8, dtype=torch.bfloat16, device="cuda")
            meta = {kk: v for kk, v in cfg.items() if kk in ("num_warps", "num_stages")}
            if kind == "gemv":
                ti._gemv_kernel.warmup(x, w, w, x, x, m, n, k, k, k // 8, ti.ONE_F32_BITS, GROUP=G, MB=cfg["MB"], BN=cfg["BN"],
                                       BB=cfg["BB"], HAS_BIAS=False, PREFETCH=cfg["PREFETCH"], KS=cfg.get("KS", 1),
                                       grid=(1,), **meta)
            else:
                ti._dequant_kernel.warmup(w, w, x, n, k, k // 8, ti.ONE_F32_BITS, GROUP=G, BN=cfg["bn"], BB=cfg["bb"], num_warps=cfg["num_warps"],
                                          grid=(1,))
            done += 1
        except Exception as e:  # noqa: BLE001 - the timed call reports it
            print("warmup failed", kind, cfg, repr(e)[:200], flush=True)
    return done


def precompile() -> float:
    t = time.perf_counter()
    jobs = [("gemv", 1, 4608, 3584, c) for c in gemv_configs_m1()]
    jobs += [("gemv", m, 4608, 3584, c) for m in MS if m <= 8 for c in gemv_configs_mb(m)]
    jobs += [("gemv", m, 4608, 3584, dict(ti.gemv_config(m, 4608, 3584))) for m in (1, 2, 4, 8)]
    jobs += [("gemv", m, 3584, 3584, dict(ti.gemv_config(m, 3584, 3584))) for m in (1, 2, 4, 8)]
    jobs += [("dequant", 0, 4608, 3584, c) for c in DEQUANT]
    workers = min(14, os.cpu_count() or 4)
    with mp.get_context("spawn").Pool(workers) as pool:
        done = sum(pool.map(_warm, [jobs[i::workers] for i in range(workers)]))
    print(f"precompiled {done}/{len(jobs)} kernels in {time.perf_counter() - t:.1f} s", flush=True)
    return time.perf_counter() - t


def bench(fn) -> float:
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=5, rep=25, return_mode="median")) * 1000


def random_weight(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    packed = torch.randint(0, 256, (n, k // 2), device="cuda", dtype=torch.uint8, generator=gen)
    s = torch.rand(k // G, n, device="cuda", generator=gen) * 0.004 + 0.001
    z = (torch.rand(k // G, n, device="cuda", generator=gen) - 0.5) * 0.02
    return packed, torch.stack([s, z], -1).to(torch.bfloat16).contiguous()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return round(float((y.float() - ref).norm() / ref.norm()), 7)


def sweep(res: dict) -> None:
    gen = torch.Generator("cuda").manual_seed(0)
    for name, (n, k) in SHAPES.items():
        packed, sz = random_weight(n, k, gen)
        tiny = torch.ops.aten._convert_weight_to_int4pack(packed, 8)
        wref = ti.dequantize_reference(packed, sz, G)  # float32
        wb = wref.to(torch.bfloat16)
        row = res["us"].setdefault(name, {})
        chk = res["check"]
        for m in (1,) + MS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
            ref = x.float() @ wref.T
            row[f"bf16_m{m}"] = bench(lambda: F.linear(x, wb))
            row[f"tiny_m{m}"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, tiny, G, sz))
            chk[f"{name}_dequant_gemm_m{m}"] = rel_err(ti._linear(x, packed, sz, None, G) if m > ti.GEMV_MAX_ROWS else
                                                       F.linear(x, ti.dequantize(packed, sz, G)), ref)
            row[f"dequant_gemm_m{m}"] = bench(lambda: F.linear(x, ti.dequantize(packed, sz, G)))
            cfgs = gemv_configs_m1() if m == 1 else gemv_configs_mb(m) if m <= 8 else []
            cfgs = cfgs + [dict(ti.gemv_config(min(m, 8), n, k))]  # more than 8 rows: one launch per 8
            for cfg in cfgs:
                key = f"gemv_m{m}_" + _key(cfg)
                if key in row:
                    continue
                try:
                    y = ti.gemv(x, packed, sz, G, **cfg)
                    chk[f"{name}_{key}"] = rel_err(y, ref)
                    row[key] = bench(lambda: ti.gemv(x, packed, sz, G, **cfg))
                except Exception as e:  # noqa: BLE001
                    row[key] = repr(e)[:120]
            if m == 1:
                row["default_m1"] = bench(lambda: torch.ops.modelcore.int4_linear(x, packed, sz, None, G))
        out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        chk[f"{name}_dequant_maxabs"] = float((ti.dequantize(packed, sz, G).float() - wref).abs().max())
        for cfg in DEQUANT:
            row["dequant_" + _key(cfg)] = bench(lambda: ti.dequantize(packed, sz, G, out=out, **cfg))
        best = sorted((v, kk) for kk, v in row.items() if kk.startswith("gemv_m1_") and isinstance(v, float))[:3]
        print(name, "bf16", round(row["bf16_m1"], 1), "tiny", round(row["tiny_m1"], 1), "default", round(row["default_m1"], 1),
              "best", [(round(v, 1), kk) for v, kk in best], flush=True)
        del packed, sz, tiny, wref, wb, out
        torch.cuda.empty_cache()


def per_token(res: dict) -> None:
    """One decode step's matmuls (28 layers x qkv, o, gate_up, down + head; distinct weights) as one CUDA graph."""
    gen = torch.Generator("cuda").manual_seed(1)
    layers = [{s: random_weight(*SHAPES[s], gen) for s in ("qkv", "o", "gate_up", "down")} for _ in range(28)]
    head = random_weight(*SHAPES["head"], gen)
    best = {s: min(((v, kk) for kk, v in res["us"][s].items() if kk.startswith("gemv_m1_") and isinstance(v, float)))[1]
            for s in SHAPES}
    best_cfg = {s: next(c for c in gemv_configs_m1() + [dict(ti.gemv_config(1, *SHAPES[s]))] if "gemv_m1_" + _key(c) == best[s])
                for s in SHAPES}
    res["best_m1_config"] = best_cfg

    def run(kind: str) -> None:
        for lay in layers + [{"head": head}]:
            for s, (p, sz) in lay.items():
                x = xm[SHAPES[s][1]]
                if kind == "default":
                    torch.ops.modelcore.int4_linear(x, p, sz, None, G)
                elif kind == "gemv":
                    ti.gemv(x, p, sz, G)
                elif kind == "best":
                    ti.gemv(x, p, sz, G, **best_cfg[s])
                elif kind == "tiny":
                    torch.ops.aten._weight_int4pack_mm(x, tinys[id(p)], G, sz)

    tinys = {id(p): torch.ops.aten._convert_weight_to_int4pack(p, 8) for lay in layers + [{"head": head}] for p, _ in lay.values()}
    out = {}
    for m, kinds in ((1, ("default", "best", "tiny")), (4, ("default", "tiny")), (8, ("default", "tiny")),
                     (16, ("default", "gemv", "tiny")), (32, ("default", "gemv", "tiny"))):
        xm = {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen) for k in (3584, 18944)}
        for kind in kinds:
            run(kind)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                run(kind)
            g.replay()
            torch.cuda.synchronize()
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            for _ in range(20):
                g.replay()
            t1.record()
            torch.cuda.synchronize()
            out[f"{kind}_m{m}_ms"] = round(t0.elapsed_time(t1) / 20, 4)
            del g
    res["per_token_graph"] = out
    print("per_token_graph", out, flush=True)
    del layers, head, tinys
    torch.cuda.empty_cache()


def prefill(res: dict) -> None:
    """28 layers x (qkv, o, gate_up, down) at 4096 tokens through modelcore.model.linear: bf16 weights vs int4
    (dequantize + the same GEMM)."""
    import modelcore.model as mm
    from modelcore.quant import Int4Linear, Int4Weights

    gen = torch.Generator("cuda").manual_seed(2)
    mods = []
    for s in ("qkv", "o", "gate_up", "down"):
        n, k = SHAPES[s]
        codes = torch.randint(0, 16, (n, k), device="cuda", dtype=torch.uint8, generator=gen)
        sc = torch.rand(n, k // G, device="cuda", generator=gen) * 0.004 + 0.001
        mods.append(Int4Linear(Int4Weights(codes, sc, -8 * sc, G), torch.zeros(n, device="cuda") if s == "qkv" else None))
    layers = [mods] * 28  # the same four weights per layer: dequantization and GEMMs still run 112 times
    xs = {k: torch.randn(4096, k, device="cuda", dtype=torch.bfloat16, generator=gen) for k in (3584, 18944)}
    dense = {id(m): mm.dequantize_cuda_int4(m.packed, m.scales_and_zeros, G) for m in mods}

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        best = 1e9
        for _ in range(3):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            torch.cuda.synchronize()
            best = min(best, t0.elapsed_time(t1))
        return round(best, 2)

    out = {}
    out["bf16_gemms_ms"] = timed(lambda: [F.linear(xs[m.in_features], dense[id(m)]) for lay in layers for m in lay])
    out["dequant_only_ms"] = timed(lambda: [mm.dequantize_cuda_int4(m.packed, m.scales_and_zeros, G) for lay in layers for m in lay])
    out["int4_ms"] = timed(lambda: [mm.linear(m, xs[m.in_features]) for lay in layers for m in lay])
    res["prefill_4096_linears"] = out
    print("prefill_4096_linears", out, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/int4_kernels.json"))
    ap.add_argument("--no-sweep", action="store_true", help="only the per-token graph (default configs) and the prefill")
    a = ap.parse_args()
    import triton

    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                 "command": "python benchmarks/int4_kernels.py " + " ".join(sys.argv[1:]), "us": {}, "check": {}}
    if not a.no_sweep:
        res["precompile_s"] = round(precompile(), 1)
        sweep(res)
        totals = {}
        for m in (1,) + MS:
            for kind in ("bf16", "tiny", "dequant_gemm"):
                totals[f"{kind}_m{m}_ms"] = round(sum(PER_TOKEN[s] * res["us"][s][f"{kind}_m{m}"] for s in SHAPES) / 1000, 3)
            totals[f"best_gemv_m{m}_ms"] = round(sum(PER_TOKEN[s] * min(
                v for kk, v in res["us"][s].items() if kk.startswith(f"gemv_m{m}_") and isinstance(v, float)) for s in SHAPES) / 1000, 3)
        totals["default_m1_ms"] = round(sum(PER_TOKEN[s] * res["us"][s]["default_m1"] for s in SHAPES) / 1000, 3)
        res["ms_per_token_sum_of_kernels"] = totals
        print(json.dumps(totals), flush=True)
        per_token(res)
    prefill(res)
    bad = {k: v for k, v in res["check"].items() if v > 0.01}
    print("checks over 1%:", bad or "none", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
