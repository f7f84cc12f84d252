"""GPU decode benchmark on a DeepSeek-R1-Distill-Qwen-7B-shaped Qwen2 model with random weights: ours vs transformers.

    python benchmarks/gpu_dense.py [--layers 28] [--new 128] [--out benchmarks/results/gpu_dense.json]

Both models share the same random bf16 weights (built once, on the GPU, by transformers' Qwen2ForCausalLM and
assigned into modelcore's Transformer without a copy). Figures: decode tok/s at batch 1 and 32 (greedy, after
a 128-token prompt), time to first token for a 4096-token prompt, for transformers bf16 (`generate`, default
dynamic cache), ours bf16 and ours int4 (group 128, `aten._weight_int4pack_mm`). Our decode step runs over a
static KV cache with fixed shapes and is replayed as one CUDA graph per batch size.
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
from modelcore.rope import apply_rotary  # noqa: E402

CFG = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
           vocab_size=152064, max_position_embeddings=32768, rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


class GraphDecoder:
    """Fixed-shape decode over a static cache (B, Hkv, L, D) per layer, captured once as a CUDA graph."""

    def __init__(self, model: Transformer, batch: int, max_len: int) -> None:
        a = model.args
        self.model, self.b, self.L = model, batch, max_len
        dev, dt = model.device, model.dtype
        self.k = [torch.zeros(batch, a.n_kv_heads, max_len, a.head_dim, device=dev, dtype=dt) for _ in range(a.n_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.tok = torch.zeros(batch, dtype=torch.long, device=dev)
        self.pos = torch.zeros(batch, dtype=torch.long, device=dev)
        self.slots = torch.arange(max_len, device=dev)
        for layer in model.model.layers:  # RoPE keeps its frequencies on the CPU; a graph must not copy host memory
            layer.self_attn.rotary.inv_freq = layer.self_attn.rotary.inv_freq.to(dev)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt (B, T) through the model's own cached forward and copy K/V into our buffers."""
        cache = self.model.new_cache(ids.shape[0], self.L)
        h = self.model.forward_hidden(ids, cache=cache)
        for i, c in enumerate(cache):
            self.k[i].copy_(c.k)
            self.v[i].copy_(c.v)
        self.pos.fill_(ids.shape[1])
        return self.model.lm_head(h[:, -1]).argmax(-1)

    def _step(self) -> torch.Tensor:
        m, b = self.model, self.b
        h = m.model.embed_tokens(self.tok)[:, None]  # (B, 1, D)
        pos = self.pos[:, None]  # (B, 1)
        mask = (self.slots[None, :] <= pos)[:, None, None, :]  # (B, 1, 1, L)
        for i, layer in enumerate(m.model.layers):
            at = layer.self_attn
            x = layer.input_layernorm(h)
            q = at.q_proj(x).view(b, 1, at.n_heads, at.head_dim).transpose(1, 2)  # (B, H, 1, D)
            k = at.k_proj(x).view(b, 1, at.n_kv_heads, at.head_dim).transpose(1, 2)  # (B, Hkv, 1, D)
            v = at.v_proj(x).view(b, 1, at.n_kv_heads, at.head_dim).transpose(1, 2)
            cos, sin = at.rotary(pos, q.dtype)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            idx = self.pos[:, None, None, None].expand(b, at.n_kv_heads, 1, at.head_dim)
            self.k[i].scatter_(2, idx, k)
            self.v[i].scatter_(2, idx, v)
            o = F.scaled_dot_product_attention(q, self.k[i], self.v[i], attn_mask=mask, scale=at.scale, enable_gqa=True)
            h = h + at.o_proj(o.transpose(1, 2).reshape(b, 1, at.n_heads * at.head_dim))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return m.lm_head(m.model.norm(h))[:, 0].argmax(-1)  # (B,)

    @torch.inference_mode()
    def decode(self, first: torch.Tensor, n: int) -> torch.Tensor:
        """n greedy tokens (B, n) starting from `first` (B,), replaying the graph."""
        if self.graph is None:
            saved = [t.clone() for t in self.k], [t.clone() for t in self.v], self.pos.clone()
            self.tok.copy_(first)
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = self._step()
            for dst, src in zip(self.k + self.v, saved[0] + saved[1]):
                dst.copy_(src)
            self.pos.copy_(saved[2])
        out = []
        self.tok.copy_(first)
        for _ in range(n):
            self.graph.replay()
            out.append(self.out.clone())
            self.tok.copy_(self.out)
            self.pos.add_(1)
        return torch.stack(out, 1)


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r


def bench_ours(model: Transformer, *, prompt: int, new: int, ttft_len: int) -> dict:
    res: dict = {}
    dev = model.device
    for b in (1, 32):
        ids = torch.randint(0, CFG["vocab_size"], (b, prompt), device=dev)
        dec = GraphDecoder(model, b, prompt + new + 8)
        first = dec.prefill(ids)
        dec.decode(first, 4)  # capture + warm up
        dec.prefill(ids)
        secs, _ = _timed(lambda: dec.decode(first, new))
        res[f"decode_b{b}_tok_s"] = round(b * new / secs, 1)
        del dec
        torch.cuda.empty_cache()
    ids = torch.randint(0, CFG["vocab_size"], (1, ttft_len), device=dev)
    dec = GraphDecoder(model, 1, ttft_len + 8)
    dec.prefill(ids)
    res["ttft_4096_ms"] = round(1000 * min(_timed(lambda: dec.prefill(ids))[0] for _ in range(3)), 1)
    return res


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
    a = ap.parse_args(argv)
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
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": CFG | {"num_hidden_layers": a.layers},
                 "prompt": a.prompt, "new_tokens": a.new, "command": "python benchmarks/gpu_dense.py " + " ".join(argv or sys.argv[1:])}
    with torch.inference_mode():
        ids = torch.randint(0, cfg.vocab_size, (1, 64), device="cuda")
        la, lb = ours(ids).logits.float(), hf(ids).logits.float()
        out["ours_vs_hf_logits_cos_min"] = round(float(F.cosine_similarity(la, lb, dim=-1).min()), 5)
    results = {}
    if not a.skip_hf:
        results["transformers_bf16"] = bench_hf(hf, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
        print("transformers_bf16", results["transformers_bf16"], flush=True)
    results["ours_bf16"] = bench_ours(ours, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
    print("ours_bf16", results["ours_bf16"], flush=True)
    bf16_bytes = torch.cuda.memory_allocated()
    quantize_model(ours, "int4", group_size=128, quantize_embeddings=False)
    del hf
    torch.cuda.empty_cache()
    with torch.inference_mode():
        lq = ours(ids).logits.float()
        out["int4_vs_bf16_logits_cos_mean"] = round(float(F.cosine_similarity(lq, la, dim=-1).mean()), 5)
    results["ours_int4_g128"] = bench_ours(ours, prompt=a.prompt, new=a.new, ttft_len=a.ttft_len)
    print("ours_int4_g128", results["ours_int4_g128"], flush=True)
    out["gpu_mem_bf16_both_models_gb"] = round(bf16_bytes / 2**30, 2)
    out["gpu_mem_int4_model_gb"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    out["results"] = results
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
