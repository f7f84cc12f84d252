"""GGUF checkpoints: parse the container with the `gguf` package, dequantize blocks ourselves, rename to HF keys.

`load_gguf(path)` returns `(ModelArgs, state_dict, tokenizer)` for Llama/Qwen2-family files. Tensor layouts:

- GGUF stores a 2-D weight with `shape = [ne0, ne1] = [in, out]`; its bytes are row-major `(out, in)`, the
  same as torch's `nn.Linear.weight`, so a tensor's torch shape is `tuple(reversed(shape))`.
- llama.cpp's converter permutes the rows of `attn_q`/`attn_k` (interleaved RoPE halves); `_unpermute` undoes it.
- With `quantization="int4"`, Q4_0/Q4_1 linear weights are kept as their 4-bit codes + per-32 scale/min
  (`modelcore.quant.Int4Weights`) instead of being expanded to float: no dequantize-requantize round trip.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .args import ModelArgs
from .errors import CheckpointError, ModelNotFoundError, UnknownArchitectureError
from .quant import Int4Weights

try:  # the parser only; dequantization below is our own
    import gguf
    from gguf import GGMLQuantizationType as QT
except ImportError as exc:  # pragma: no cover - gguf is a hard dependency in pyproject
    raise ImportError("modelcore.gguf needs the `gguf` package: pip install gguf") from exc

SUPPORTED_ARCHS = ("llama", "qwen2")

# GGUF block name -> HF module name (per layer)
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LINEAR_SUFFIXES = ("_proj",)


# ---------------------------------------------------------------- dequantization (numpy, our own)
def _f16(raw: np.ndarray) -> np.ndarray:
    """Reinterpret a (..., 2) uint8 slice as float16 -> float32, shape (...)."""
    return np.ascontiguousarray(raw).view(np.float16)[..., 0].astype(np.float32)


def _blocks(raw: np.ndarray, block_bytes: int) -> np.ndarray:
    flat = np.ascontiguousarray(raw).reshape(-1)
    assert flat.size % block_bytes == 0, "tensor bytes are not a whole number of blocks"
    return flat.reshape(-1, block_bytes)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(B, 16) packed bytes -> (B, 32) codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_codes(raw: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0/Q4_1 blocks -> (codes (B, 32) uint8 in 0..15, scale (B,), min (B,)) with w = code * scale + min."""
    if qtype == QT.Q4_0:
        b = _blocks(raw, 18)
        d = _f16(b[:, 0:2])
        return _nibbles(b[:, 2:]), d, -8.0 * d
    b = _blocks(raw, 20)
    return _nibbles(b[:, 4:]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _scale_min_k4(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes of packed 6-bit (scale, min) pairs -> two (B, 8) arrays."""
    s = scales.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _dequant_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 144)  # d f16, dmin f16, scales[12], qs[128]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 chunks of 64 values, 32 bytes each
    q = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)  # (B, 8 sub-blocks, 32)
    return (d[:, None, None] * sc[:, :, None] * q - dmin[:, None, None] * mn[:, :, None]).reshape(-1)


def _dequant_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, 210)  # ql[128], qh[64], scales[16] int8, d f16
    ql = b[:, :128].reshape(-1, 2, 64)
    qh = b[:, 128:192].reshape(-1, 2, 32)
    sc = b[:, 192:208].view(np.int8).astype(np.float32).reshape(-1, 2, 8)
    d = _f16(b[:, 208:210])
    lo = np.stack([ql[..., :32] & 0x0F, ql[..., 32:] & 0x0F, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=2)
    hi = np.stack([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=2)
    q = (lo | (hi << 4)).astype(np.float32) - 32.0  # (B, 2 halves, 4 quarters, 32)
    scale = sc.reshape(-1, 2, 4, 2)  # scale index per 16 values: quarter j uses sc[2j + l // 16]
    q = q.reshape(-1, 2, 4, 2, 16) * scale[..., None]
    return (d[:, None, None, None, None] * q).reshape(-1)


def dequantize(raw: np.ndarray, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Raw GGUF tensor bytes of type `qtype` -> float32 torch tensor of torch `shape`."""
    n = int(np.prod(shape))
    if qtype == QT.F32:
        out = np.ascontiguousarray(raw).view(np.float32).reshape(-1)
    elif qtype == QT.F16:
        out = np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(np.float32)
    elif qtype == QT.BF16:
        bits = np.ascontiguousarray(raw).view(np.uint16).reshape(-1).astype(np.uint32) << 16
        out = bits.view(np.float32)
    elif qtype == QT.Q8_0:
        b = _blocks(raw, 34)
        out = b[:, 2:].view(np.int8).astype(np.float32)  # one float32 array, scaled in place
        out *= _f16(b[:, 0:2])[:, None]
        out = out.reshape(-1)
    elif qtype in (QT.Q4_0, QT.Q4_1):
        codes, scale, mn = _q4_codes(raw, qtype)
        out = (codes.astype(np.float32) * scale[:, None] + mn[:, None]).reshape(-1)
    elif qtype == QT.Q4_K:
        out = _dequant_q4_k(raw)
    elif qtype == QT.Q6_K:
        out = _dequant_q6_k(raw)
    else:
        raise CheckpointError(f"GGUF tensor type {qtype.name} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")
    if out.size != n:
        raise CheckpointError(f"GGUF tensor has {out.size} values, expected {n} for shape {shape}")
    if qtype == QT.F32:  # a view of the memory-mapped file: copy it out; every other type computed a new array
        out = np.array(out, dtype=np.float32, copy=True)
    return torch.from_numpy(out).reshape(shape)


def q4_int4_weights(raw: np.ndarray, qtype: QT, shape: tuple[int, int]) -> Int4Weights:
    """Q4_0/Q4_1 bytes -> int4 group-32 codes + scale/min, without going through float weights."""
    out_f, in_f = shape
    codes, scale, mn = _q4_codes(raw, qtype)
    return Int4Weights(
        codes=torch.from_numpy(codes.reshape(out_f, in_f).copy()),
        scales=torch.from_numpy(scale.reshape(out_f, in_f // 32).copy()),
        mins=torch.from_numpy(mn.reshape(out_f, in_f // 32).copy()),
        group_size=32,
    )


# ---------------------------------------------------------------- names, permutation, config
def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> half-split RoPE), rows = n_heads * head_dim."""
    rows = w.shape[0]
    assert rows % (2 * n_heads) == 0, "q/k rows must split into heads and RoPE halves"
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)  # (H, 2, D/2, ...)


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for tensors we do not use."""
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        mod = _LAYER_NAMES.get(parts[2])
        return None if mod is None else f"model.layers.{parts[1]}.{mod}.{parts[3]}"
    mod = _TOP_NAMES.get(parts[0])
    return None if mod is None else f"{mod}.{parts[1]}"


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def model_args(reader: gguf.GGUFReader) -> ModelArgs:
    """GGUF metadata (`{arch}.*`, `tokenizer.ggml.*`) -> ModelArgs."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise UnknownArchitectureError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    a = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_heads = int(a("attention.head_count"))
    dim = int(a("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = a("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens", []))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    key_len = a("attention.key_length")
    rope_scaling = None
    if a("rope.scaling.type") in ("linear", "yarn"):
        rope_scaling = {"rope_type": a("rope.scaling.type"), "factor": float(a("rope.scaling.factor", 1.0))}
    return ModelArgs(
        model_type=arch,
        vocab_size=int(vocab),
        dim=dim,
        n_layers=int(a("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(a("attention.head_count_kv", n_heads)),
        head_dim=int(key_len) if key_len else dim // n_heads,
        inter_dim=int(a("feed_forward_length")),
        max_position_embeddings=int(a("context_length", 4096)),
        rms_norm_eps=float(a("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(a("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        attention_bias="blk.0.attn_q.bias" in names,
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=[] if eos is None else [int(eos)],
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """Memory-map a GGUF file, turning a missing or corrupt file into a modelcore error."""
    p = Path(path)
    if not p.is_file():
        raise ModelNotFoundError(f"GGUF file {p} does not exist")
    try:
        return gguf.GGUFReader(p)
    except Exception as exc:  # the parser raises ValueError/IndexError/... on bad bytes
        raise CheckpointError(f"{p} is not a readable GGUF file: {exc}") from exc


def stores_int4(path: str | os.PathLike[str]) -> bool:
    """True for a .gguf file whose linear weights are all Q4_0/Q4_1: `quantization="int4"` then keeps the file's own
    4-bit codes exactly (nothing re-quantized), so it is the natural way to run it."""
    p = Path(path)
    if p.suffix.lower() != ".gguf" or not p.is_file():
        return False
    types = {QT(int(t.tensor_type)) for t in open_gguf(p).tensors
             if (hf_name(t.name) or "").endswith("_proj.weight") and len(t.shape) == 2}
    return bool(types) and types <= {QT.Q4_0, QT.Q4_1}


def gguf_state_dict(
    reader: gguf.GGUFReader, args: ModelArgs, *, quantization: str | None = None
) -> dict[str, torch.Tensor | Int4Weights]:
    """HF-named float32 tensors; Q4_0/Q4_1 linear weights stay `Int4Weights` when quantization == "int4"."""
    sd: dict[str, torch.Tensor | Int4Weights] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        qtype = QT(int(t.tensor_type))
        direct = quantization == "int4" and qtype in (QT.Q4_0, QT.Q4_1) and name.endswith("_proj.weight") and len(shape) == 2
        w: torch.Tensor | Int4Weights = q4_int4_weights(t.data, qtype, shape) if direct else dequantize(t.data, qtype, shape)
        if ".q_proj." in name or ".k_proj." in name:
            heads = args.n_heads if ".q_proj." in name else args.n_kv_heads
            w = w.map_rows(lambda x: _unpermute(x, heads)) if isinstance(w, Int4Weights) else _unpermute(w, heads)
        sd[name] = w
    if args.tie_word_embeddings and "lm_head.weight" not in sd:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    missing = [k for k in ("model.embed_tokens.weight", "model.norm.weight") if k not in sd]
    if missing:
        raise CheckpointError(f"GGUF file lacks tensors {missing}")
    return sd


def load_gguf(path: str | os.PathLike[str], *, quantization: str | None = None) -> tuple[ModelArgs, dict[str, Any], Any]:
    """Read a GGUF file -> (ModelArgs, HF-named state_dict, modelcore tokenizer)."""
    reader = open_gguf(path)
    args = model_args(reader)
    sd = gguf_state_dict(reader, args, quantization=quantization)
    from .gguf_tokenizer import tokenizer_from_gguf

    return args, sd, tokenizer_from_gguf(reader)
