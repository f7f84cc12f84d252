"""Command line: `python -m modelcore generate|chat|bench ...`."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Sequence

from modelcore.errors import ModelCoreError


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model folder or .gguf file")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None, help="0 or unset: greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modelcore", description="modelcore: load a model, generate, chat, benchmark")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="continue a prompt (streams to stdout)")
    _sampling_flags(g)
    g.add_argument("--prompt", default=None, help="prompt text (default: read stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as a user message with the model's chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    c = sub.add_parser("chat", help="interactive chat on stdin/stdout; empty line or EOF quits")
    _sampling_flags(c)
    c.add_argument("--system", default=None)
    sub.add_parser("bench", help="benchmarks (modelcore.bench)", add_help=False)
    return parser


def _load(ns: argparse.Namespace):
    from modelcore.auto import AutoModel

    model = AutoModel.from_pretrained(ns.model, device_map=ns.device, quantization=ns.quantization, dtype=ns.dtype)
    if model.tokenizer is None:
        raise ModelCoreError(f"{ns.model}: no tokenizer found next to the weights; the CLI needs one")
    return model


def _options(ns: argparse.Namespace) -> dict[str, Any]:
    return dict(max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_k=ns.top_k, top_p=ns.top_p,
                repetition_penalty=ns.repetition_penalty, seed=ns.seed, stop_strings=ns.stop)


def _stream_to_stdout(model, prompt_ids, options: dict[str, Any]) -> str:
    """Stream one reply to stdout; returns its text."""
    pieces = []
    t0 = time.perf_counter()
    for piece in model.stream(prompt_ids, **options):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stderr.write(f"[{time.perf_counter() - t0:.2f}s]\n")
    return "".join(pieces)


def cmd_generate(ns: argparse.Namespace) -> int:
    prompt = ns.prompt if ns.prompt is not None else sys.stdin.read()
    model = _load(ns)
    tok = model.tokenizer
    if ns.chat:
        msgs = ([{"role": "system", "content": ns.system}] if ns.system else []) + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_tensors="pt")
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    _stream_to_stdout(model, ids, _options(ns))
    return 0


def cmd_chat(ns: argparse.Namespace) -> int:
    model = _load(ns)
    tok = model.tokenizer
    messages: list[dict[str, str]] = [{"role": "system", "content": ns.system}] if ns.system else []
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line or not line.strip():
            return 0
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_tensors="pt")
        reply = _stream_to_stdout(model, ids, _options(ns))
        messages.append({"role": "assistant", "content": reply})


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from modelcore.bench import main as bench_main  # written by the quantization/benchmark helper

        bench_main(argv[1:])  # prints and saves its own figures
        return 0
    ns = build_parser().parse_args(argv)
    try:
        return {"generate": cmd_generate, "chat": cmd_chat}[ns.command](ns)
    except (ModelCoreError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
