"""CPU benchmark of the bundled GGUF generator: ours (float/int8/int4) vs transformers (fp32 eager) vs llama.cpp.

    python -m modelcore bench [--engines ours-int4,ours-int8,ours-bf16,ours-fp32,transformers,llamacpp,sizes] \
        [--threads 2] [--decode-tokens 64] [--out benchmarks/results/modelcore_cpu.json]

Each engine runs in its own subprocess (so peak RSS is its own) with the same thread count. Figures:
load time, prefill tok/s for 512- and 2048-token prompts, time to first token for a 194-token prompt,
greedy decode tok/s at batch 1 and 8 (64 new tokens after a 64-token prompt), peak RSS, and for ours the
bytes of weights; engine "sizes" loads bf16/int8/int4/int4 with int4 embeddings and reports their resident
weight bytes (all parameters and buffers). llama.cpp runs through llama-cpp-python from a separate venv (`--llama-python` or
$KD_LLAMA_PYTHON, default /tmp/llamavenv/bin/python), on the same GGUF file with the same thread count,
driving llama.cpp's C API so that batch 8 is measured too; it is skipped with a note when that venv is missing.
This module imports torch lazily so the llama.cpp child can run from a venv without torch.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KD_SHARED_DIR") or REPO.parent / "shared")
ENGINES = ("ours-int4", "ours-int8", "ours-bf16", "ours-fp32", "transformers", "llamacpp", "sizes")  # + "ours-int4-emb4"
TTFT_PROMPT = 194  # tokens, the size the reference llama.cpp figure was measured at


def _text_ids(encode, n: int, offset: int = 0) -> list[int]:
    """n token ids of TAT-QA report prose (deterministic), starting `offset` paragraphs in."""
    docs = json.loads((SHARED / "eval" / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
    paras = [p["text"] for d in docs for p in d["paragraphs"]]
    ids = encode("\n\n".join(paras[offset:offset + 400]))
    assert len(ids) >= n, f"corpus too short for {n} tokens"
    return ids[:n]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- ours
def _bench_ours(mode: str, *, model_path: Path, decode_tokens: int, lengths: tuple[int, ...]) -> dict:
    import torch

    from modelcore.auto import AutoModel
    from modelcore.generate import decode_one_token, prefill
    from modelcore.quant import quantized_nbytes

    quant = {"ours-int4": "int4", "ours-int8": "int8", "ours-int4-emb4": "int4"}.get(mode)
    extra = {"embeddings": "int4"} if mode == "ours-int4-emb4" else {}
    from modelcore.defaults import cpu_has_native_bf16

    # the bf16 model computes in bf16; the quantized ones as the product runs them (portal/generation.py): bf16
    # activations on CPUs with bf16 units, float32 elsewhere (bf16 GEMMs there are several times slower)
    if mode == "ours-fp32" or (mode != "ours-bf16" and not cpu_has_native_bf16()):
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
    t0 = time.perf_counter()
    model = AutoModel.from_pretrained(model_path, device_map="cpu", quantization=quant, dtype=dtype, **extra)
    load_s = time.perf_counter() - t0
    enc = lambda s: model.tokenizer.encode(s, add_special_tokens=False)  # noqa: E731

    @torch.inference_mode()
    def run_prefill(ids: list[list[int]], max_len: int) -> tuple[float, torch.Tensor, torch.Tensor, list]:
        x = torch.tensor(ids)
        cache = model.new_cache(x.shape[0], max_len)
        t = time.perf_counter()
        logits, pos = prefill(model, x, torch.ones_like(x), cache)
        tok = logits.argmax(-1)
        return time.perf_counter() - t, tok, pos, cache

    @torch.inference_mode()
    def run_decode(tok: torch.Tensor, pos: torch.Tensor, cache: list, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            tok = decode_one_token(model, tok, pos, cache).argmax(-1)
            pos = pos + 1
        return time.perf_counter() - t

    return _common_figures(enc, run_prefill, run_decode, decode_tokens, lengths) | {
        "load_s": round(load_s, 3), "weights_mb": round(quantized_nbytes(model) / 2**20, 1),
        "dtype": str(dtype).removeprefix("torch."), "quantization": quant,
    }


def _common_figures(enc, run_prefill, run_decode, decode_tokens: int, lengths: tuple[int, ...]) -> dict:
    """Shared protocol for ours and transformers: warm-up, prefill 512/2048, TTFT, decode b1/b8."""
    out: dict = {}
    warm = _text_ids(enc, 32)
    _, tok, pos, cache = run_prefill([warm], 64)
    run_decode(tok, pos, cache, 4)
    for n in lengths:
        ids = _text_ids(enc, n)
        secs = min(run_prefill([ids], n + 1)[0] for _ in range(2 if n == 512 else 1))
        out[f"prefill_{n}_tok_s"] = round(n / secs, 1)
    ttft = min(run_prefill([_text_ids(enc, TTFT_PROMPT, 7)], TTFT_PROMPT + 1)[0] for _ in range(3))
    out["ttft_194_s"] = round(ttft, 4)
    for b in (1, 8):
        prompts = [_text_ids(enc, 64, 11 * i) for i in range(b)]
        _, tok, pos, cache = run_prefill(prompts, 64 + decode_tokens + 1)
        secs = run_decode(tok, pos, cache, decode_tokens)
        out[f"decode_b{b}_tok_s"] = round(b * decode_tokens / secs, 1)
    return out


# ---------------------------------------------------------------- transformers
def _bench_transformers(*, model_path: Path, decode_tokens: int, lengths: tuple[int, ...]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, attn_implementation="eager",
                                                 dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(model_path.parent), gguf_file=model_path.name)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731

    @torch.inference_mode()
    def run_prefill(ids: list[list[int]], max_len: int):
        x = torch.tensor(ids)
        cache = DynamicCache()
        t = time.perf_counter()
        out = model(x, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t, nxt, x.shape[1], out.past_key_values

    @torch.inference_mode()
    def run_decode(nxt, pos, cache, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            out = model(nxt[:, None], past_key_values=cache, use_cache=True)
            cache, nxt = out.past_key_values, out.logits[:, -1].argmax(-1)
        return time.perf_counter() - t

    return _common_figures(enc, run_prefill, run_decode, decode_tokens, lengths) | {"load_s": round(load_s, 3), "dtype": "float32"}


# ---------------------------------------------------------------- llama.cpp (runs in its own venv, no torch)
def _bench_llamacpp(*, model_path: Path, decode_tokens: int, threads: int, lengths: tuple[int, ...]) -> dict:
    """llama.cpp through llama-cpp-python's C API bindings (llama_decode on a llama_batch), same protocol as ours.

    The high-level `Llama` object holds one sequence; the C API's batch takes several sequences (seq_id per
    token), so batch 8 is measured the way ours is: 8 prompts prefilled in one batch, then one decode call per
    step that advances all 8. Greedy = argmax of the returned logits, as ours. Prompts are cut into llama.cpp's
    default 512-token batches.
    """
    import llama_cpp as L
    import numpy as np

    quiet = L.llama_log_callback(lambda level, text, user: None)  # llama.cpp logs every context to stderr
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    t0 = time.perf_counter()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(str(model_path).encode("utf-8"), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {model_path}")
    max_prompt = max(lengths + (TTFT_PROMPT,)) + 8

    def new_ctx(n_ctx: int, n_seq: int):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = n_ctx, 512, 512, n_seq
        cp.n_threads, cp.n_threads_batch = threads, threads
        ctx = L.llama_init_from_model(model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    ctx1 = new_ctx(max_prompt + 64, 1)
    load_s = time.perf_counter() - t0
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(512, 0, 8)

    def enc(text: str) -> list[int]:
        raw = text.encode("utf-8")
        buf = (L.llama_token * (len(raw) + 8))()
        n = L.llama_tokenize(vocab, raw, len(raw), buf, len(buf), False, False)
        assert n >= 0, "tokenize buffer too small"
        return list(buf[:n])

    def decode(ctx, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, sequence, wants logits), at most 512."""
        batch.n_tokens = len(entries)
        for i, (tok, pos, seq, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, logits
            batch.seq_id[i][0] = seq
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")

    def argmax(ctx, i: int) -> int:
        return int(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(n_vocab,)).argmax())

    def run_prefill(ctx, prompts: list[list[int]]) -> tuple[float, list[int]]:
        """Prefill every prompt (one sequence each) and pick its first token; returns (seconds, tokens)."""
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t = time.perf_counter()
        flat = [(tok, pos, seq, pos == len(p) - 1) for seq, p in enumerate(prompts) for pos, tok in enumerate(p)]
        firsts: list[int] = []
        for i in range(0, len(flat), 512):
            chunk = flat[i:i + 512]
            decode(ctx, chunk)
            firsts += [argmax(ctx, j) for j, e in enumerate(chunk) if e[3]]
        return time.perf_counter() - t, firsts

    def run_decode(ctx, toks: list[int], start: list[int], n: int) -> float:
        t = time.perf_counter()
        pos = list(start)
        for _ in range(n):
            decode(ctx, [(tok, p, seq, True) for seq, (tok, p) in enumerate(zip(toks, pos))])
            toks = [argmax(ctx, j) for j in range(len(toks))]
            pos = [p + 1 for p in pos]
        return time.perf_counter() - t

    out: dict = {}
    warm = _text_ids(enc, 32)
    _, first = run_prefill(ctx1, [warm])
    run_decode(ctx1, first, [len(warm)], 4)
    for n in lengths:
        ids = _text_ids(enc, n)
        out[f"prefill_{n}_tok_s"] = round(n / min(run_prefill(ctx1, [ids])[0] for _ in range(2 if n == 512 else 1)), 1)
    out["ttft_194_s"] = round(min(run_prefill(ctx1, [_text_ids(enc, TTFT_PROMPT, 7)])[0] for _ in range(3)), 4)
    for b in (1, 8):
        ctx = ctx1 if b == 1 else new_ctx(b * (64 + decode_tokens + 8), b)  # n_ctx is split among the sequences
        prompts = [_text_ids(enc, 64, 11 * i) for i in range(b)]
        _, first = run_prefill(ctx, prompts)
        out[f"decode_b{b}_tok_s"] = round(b * decode_tokens / run_decode(ctx, first, [64] * b, decode_tokens), 1)
        if ctx is not ctx1:
            L.llama_free(ctx)
    L.llama_batch_free(batch)
    L.llama_free(ctx1)
    L.llama_model_free(model)
    return out | {"load_s": round(load_s, 3), "llama_cpp_python": L.__version__, "api": "llama_decode (C API), greedy argmax"}


# ---------------------------------------------------------------- resident weight sizes
SIZE_CONFIGS = {
    "bf16": {"dtype": "bfloat16"},
    "int8": {"quantization": "int8", "dtype": "bfloat16"},
    "int4": {"quantization": "int4", "dtype": "bfloat16"},  # Q4_1 codes kept; tied embedding/head int8
    "int4_emb4": {"quantization": "int4", "dtype": "bfloat16", "embeddings": "int4"},  # tied embedding/head int4 too
    "int4_g64_emb4": {"quantization": "int4", "dtype": "bfloat16", "embeddings": "int4", "group_size": 64},  # ≤0.3x, +35% ppl
}


def _sizes(*, model_path: Path) -> dict:
    """Bytes of every parameter and buffer (tensors shared by tied modules counted once) per configuration."""
    from modelcore.auto import AutoModel
    from modelcore.quant import quantized_nbytes

    out: dict = {}
    for name, kw in SIZE_CONFIGS.items():
        model = AutoModel.from_pretrained(model_path, device_map="cpu", **kw)
        out[name] = {"weights_mib": round(quantized_nbytes(model) / 2**20, 2)}
        del model
    for r in out.values():
        r["vs_bf16"] = round(r["weights_mib"] / out["bf16"]["weights_mib"], 4)
    return out | {"counted": "all parameters and buffers, shared tensors once (modelcore.quant.quantized_nbytes)"}


# ---------------------------------------------------------------- driver
def _child(engine: str, *, model_path: Path, threads: int, decode_tokens: int, lengths: tuple[int, ...]) -> dict:
    if engine != "llamacpp":
        import torch

        torch.set_num_threads(threads)
    if engine.startswith("ours-"):
        res = _bench_ours(engine, model_path=model_path, decode_tokens=decode_tokens, lengths=lengths)
    elif engine == "sizes":
        res = _sizes(model_path=model_path)
    elif engine == "transformers":
        res = _bench_transformers(model_path=model_path, decode_tokens=decode_tokens, lengths=lengths)
    else:
        res = _bench_llamacpp(model_path=model_path, decode_tokens=decode_tokens, threads=threads, lengths=lengths)
    return res | {"peak_rss_mb": round(_peak_rss_mb(), 1)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m modelcore bench", description=__doc__.split("\n")[0])
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2 Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--prefill-lengths", default="512,2048")
    ap.add_argument("--llama-python", default=os.environ.get("KD_LLAMA_PYTHON", "/tmp/llamavenv/bin/python"),
                    help="interpreter of the venv holding llama-cpp-python (env KD_LLAMA_PYTHON)")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "modelcore_cpu.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.model:
        model_path = Path(a.model)
    else:
        from modelcore.defaults import default_generator_path

        model_path = default_generator_path()
    lengths = tuple(int(n) for n in a.prefill_lengths.split(","))
    if a.child:
        print(json.dumps(_child(a.child, model_path=model_path, threads=a.threads, decode_tokens=a.decode_tokens, lengths=lengths)))
        return {}
    results: dict[str, dict] = {}
    for engine in a.engines.split(","):
        py = a.llama_python if engine == "llamacpp" else sys.executable
        if not Path(py).exists():
            results[engine] = {"skipped": f"{py} not found (install llama-cpp-python into that venv)"}
            print(f"{engine:14s} skipped: {py} missing", flush=True)
            continue
        cmd = [py, "-m", "modelcore.bench", "--child", engine, "--model", str(model_path), "--threads", str(a.threads),
               "--decode-tokens", str(a.decode_tokens), "--prefill-lengths", a.prefill_lengths]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), HF_HUB_OFFLINE="1", DO_NOT_TRACK="true",
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results[engine] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
        else:
            results[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{engine:14s} {json.dumps(results[engine])}", flush=True)
    out = {
        "model": model_path.name, "threads": a.threads, "decode_tokens": a.decode_tokens, "cpu": _cpu_name(),
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()], "command": "python -m modelcore bench " + " ".join(argv or sys.argv[1:]),
        "results": results,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
