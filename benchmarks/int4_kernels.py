"""CUDA int4 kernel sweep at decode shapes of the 7B Qwen2 shape: torch tinygemm (inner_k_tiles, group) vs our Triton
half-split kernel (modelcore/triton_int4.py; BN, warps, stages), plus prefill dequantization time.

    python benchmarks/int4_kernels.py --out benchmarks/results/int4_kernels.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from modelcore import triton_int4 as ti  # noqa: E402
from modelcore.quant import quantize_int4  # noqa: E402

SHAPES = {"qkv": (4608, 3584), "o": (3584, 3584), "gate_up": (37888, 3584), "down": (3584, 18944), "head": (152064, 3584)}
PER_TOKEN = {"qkv": 28, "o": 28, "gate_up": 28, "down": 28, "head": 1}


def bench(fn) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=10, rep=40, return_mode="median")) * 1000  # us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/int4_kernels.json"))
    ap.add_argument("--gemv", action="store_true", help="only the batch-1 GEMV sweep (group 128) and the tiled dequant")
    ap.add_argument("--dequant", action="store_true", help="only tinygemm and the tiled dequant (group 128)")
    a = ap.parse_args()
    if a.gemv or a.dequant:
        return gemv_sweep(a.out, gemv=a.gemv)
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "us": {}, "check": {}}
    totals: dict = {}
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        for m in (1, 32):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = res["us"].setdefault(f"{name}_m{m}", {})
            wb = w.to(torch.bfloat16)
            row["bf16"] = bench(lambda: F.linear(x, wb))
            for g in (128, 64, 32):
                qw = quantize_int4(w, group_size=g)
                ref = x.float() @ qw.dequantize(torch.float32).T
                sz = torch.stack([qw.scales.float(), qw.mins.float() + 8 * qw.scales.float()], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
                hi_first = ((qw.codes[:, 0::2] << 4) | qw.codes[:, 1::2]).contiguous()
                for ikt in (2, 4, 8):
                    if g == 32 and ikt == 8 and False:
                        continue
                    try:
                        pk = torch.ops.aten._weight_int4pack_mm.default if False else None
                        packed = torch.ops.aten._convert_weight_to_int4pack(hi_first, ikt)
                        row[f"tiny_g{g}_k{ikt}"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, packed, g, sz))
                    except Exception as e:  # noqa: BLE001
                        row[f"tiny_g{g}_k{ikt}"] = repr(e)[:80]
                    del packed
                hs = ti.pack_half_split(qw.codes, g)
                y = ti.int4_mm_op(x, hs, sz, g, n).float()
                res["check"][f"{name}_m{m}_g{g}"] = round(float((y - ref).abs().max() / ref.abs().max()), 6)
                auto = ti.choose_split(m, n, k, g, 64)
                for bn in (32, 64, 128):
                    for nw in (4, 8):
                        for st in (3, 4):
                            if g != 128 and (nw, st) != (4, 3):
                                continue
                            for sp in {ti.choose_split(m, n, k, g, bn), auto}:
                                try:
                                    row[f"tri_g{g}_bn{bn}_w{nw}_s{st}_sp{sp}"] = bench(
                                        lambda: ti.int4_mm_partials(x, hs, sz, g, n, split=sp, bn=bn, num_warps=nw, num_stages=st).sum(0))
                                except Exception as e:  # noqa: BLE001
                                    row[f"tri_g{g}_bn{bn}_w{nw}_s{st}_sp{sp}"] = repr(e)[:80]
                row[f"op_g{g}"] = bench(lambda: ti.int4_mm_op(x, hs, sz, g, n))
                if m == 1 and g == 128:
                    from modelcore.model import dequantize_cuda_int4
                    p8 = torch.ops.aten._convert_weight_to_int4pack(hi_first, 8)
                    row["dequant_old"] = bench(lambda: dequantize_cuda_int4(p8, sz, g, n, k))
                    row["dequant_triton"] = bench(lambda: ti.dequantize(hs, sz, g, n, k))
                    dq = ti.dequantize(hs, sz, g, n, k).float()
                    res["check"][f"{name}_dequant_maxerr"] = float((dq - qw.dequantize(torch.float32)).abs().max())
                    del p8
        torch.cuda.empty_cache()
        print(name, {kk: (round(v, 1) if isinstance(v, float) else v) for kk, v in sorted(res["us"][f"{name}_m1"].items(), key=lambda t: str(t[1]))[:12]}, flush=True)
    for m in (1, 32):
        keys = set.intersection(*[set(res["us"][f"{s}_m{m}"]) for s in SHAPES])
        tot = {kk: sum(PER_TOKEN[s] * res["us"][f"{s}_m{m}"][kk] for s in SHAPES) / 1000 for kk in keys
               if all(isinstance(res["us"][f"{s}_m{m}"][kk], float) for s in SHAPES)}
        totals[f"m{m}_ms_per_step"] = dict(sorted(tot.items(), key=lambda t: t[1])[:25])
        # best per shape (any config, same group)
        for g in (128, 64, 32):
            best = 0.0
            for s in SHAPES:
                r = res["us"][f"{s}_m{m}"]
                best += PER_TOKEN[s] * min(v for kk, v in r.items() if kk.startswith(f"tri_g{g}_") and isinstance(v, float)) / 1000
            totals[f"m{m}_best_per_shape_tri_g{g}_ms"] = round(best, 3)
    res["totals"] = totals
    print(json.dumps(totals, indent=1), json.dumps(res["check"]), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))


def gemv_sweep(out: str, gemv: bool = True) -> None:
    from modelcore.model import _cuda_int4_tile_order, _dequantize_cuda_int4
    torch.manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name(), "us": {}, "check": {}}
    g = 128
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda") * 0.02
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        qw = quantize_int4(w, group_size=g)
        ref = (x.float() @ qw.dequantize(torch.float32).T)[0]
        sz = torch.stack([qw.scales.float(), qw.mins.float() + 8 * qw.scales.float()], -1).transpose(0, 1).to(torch.bfloat16).contiguous()
        p8 = torch.ops.aten._convert_weight_to_int4pack(((qw.codes[:, 0::2] << 4) | qw.codes[:, 1::2]).contiguous(), 8)
        hs = ti.pack_half_split(qw.codes, g)
        row = res["us"].setdefault(name, {})
        row["tiny_k8"] = bench(lambda: torch.ops.aten._weight_int4pack_mm(x, p8, g, sz))
        where = _cuda_int4_tile_order(x.device)
        dq = ti.dequantize_tiled(p8, sz, where, g, n, k)
        res["check"][f"{name}_tiled_dequant_vs_torch_maxabs"] = float((dq.float() - _dequantize_cuda_int4(p8, sz, where, g, n, k).float()).abs().max())
        res["check"][f"{name}_tiled_dequant_vs_codes_maxabs"] = float((dq.float() - qw.dequantize(torch.float32)).abs().max())
        row["dequant_tiled_triton"] = bench(lambda: ti.dequantize_tiled(p8, sz, where, g, n, k))
        buf = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        row["dequant_tiled_triton_buf"] = bench(lambda: ti.dequantize_tiled(p8, sz, where, g, n, k, out=buf))
        for bn in (16, 32, 64) if gemv else ():
            for gpi in (2, 4):
                for nw in (4, 8):
                    key = f"gemv_bn{bn}_gpi{gpi}_w{nw}"
                    try:
                        y = ti.int4_gemv_partials(x, hs, sz, g, n, bn=bn, gpi=gpi, num_warps=nw).sum(0)
                        err = float((y - ref).abs().max() / ref.abs().max())
                        row[key] = bench(lambda: ti.int4_gemv_partials(x, hs, sz, g, n, bn=bn, gpi=gpi, num_warps=nw).sum(0))
                        res["check"][f"{name}_{key}"] = round(err, 6)
                    except Exception as e:  # noqa: BLE001
                        row[key] = repr(e)[:80]
        del w, p8, hs, buf, dq
        torch.cuda.empty_cache()
        print(name, sorted([(round(v, 1), kk) for kk, v in row.items() if isinstance(v, float)])[:8], flush=True)
    keys = set.intersection(*[set(r) for r in res["us"].values()])
    tot = {kk: sum(PER_TOKEN[s] * res["us"][s][kk] for s in SHAPES) / 1000 for kk in keys
           if all(isinstance(res["us"][s][kk], float) for s in SHAPES)}
    res["ms_per_step"] = dict(sorted(tot.items(), key=lambda t: t[1])[:12])
    res["best_per_shape_gemv_ms"] = None if not gemv else sum(PER_TOKEN[s] * min(v for kk, v in res["us"][s].items() if kk.startswith("gemv") and isinstance(v, float))
                                        for s in SHAPES) / 1000
    print(json.dumps({kk: res[kk] for kk in ("ms_per_step", "best_per_shape_gemv_ms")}, indent=1), flush=True)
    print(json.dumps({kk: v for kk, v in res["check"].items() if "tiled" in kk or v > 0.01}), flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
