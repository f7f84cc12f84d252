"""The whole layer stack of a CPU decode step in one C call (`mc_llama_decode` in csrc/decode_cpu.c), for any rows.

Why: a Llama layer is ~20 torch ops around its four matmuls, and each op costs microseconds of dispatch on a CPU
(5 us for a 576-element multiply on a 2-core VM), more than the layer's int4 matmuls themselves. The C step does the
same maths as `Block.forward` (RMSNorm, fused q/k/v with bias, rotate-half RoPE from the model's own cos/sin
table, the KV cache write at the position, softmax attention over the cache with GQA and an optional sliding
window, o projection, SwiGLU) in float32 with our int4 kernel, then the final norm; the torch side keeps the
embedding lookup, the output head and sampling. The torch path stays the naive twin (tests/modelcore/test_cpu_decode.py). An int8 output head on an AVX512-VNNI build runs on a copy of its
weight in the int4 kernel's block layout (`cpu_int4.pack_int8_blocks`, +1 byte per weight, built once per head): 8
rows in 0.5 ms where the row-major kernel took 1.6 ms on SmolLM2's 49,152 x 576 head.

Taken by `generate` for batch 1 on CPU when every layer is a GQA `Attention` + SwiGLU `MLP` with fused projections
on the native int4 kernel, silu, a RoPE table, and a float32 cache; anything else keeps the torch path.
`MODELCORE_FUSED_DECODE=0` turns it off.
"""
from __future__ import annotations

import ctypes
import os
import weakref

import torch

from modelcore import cpu_int4

FIELDS = ("norm1", "qkv", "qkv_s", "qkv_b", "o", "o_s", "norm2", "gu", "gu_s", "down", "down_s")


def _native(mod) -> bool:
    return getattr(mod, "kernel", None) == "native"


_HEAD_BLOCKS: dict[int, tuple] = {}  # id(weight) -> (weakref to it, blocks, scales); an entry goes with its weight


def head_blocks(head, kernel: cpu_int4.Kernel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(blocks, float32 scales) of a native int8 output head for `kernel`'s block-layout matmul, built once per head
    weight (held weakly: a replaced or freed weight drops its copy), or None where that kernel does not apply."""
    from modelcore.quant import Int8Linear

    if not (isinstance(head, Int8Linear) and _native(head) and kernel.int8_blocked):
        return None
    w = head.weight
    if w.dim() != 2 or w.shape[0] % cpu_int4.ROWS or w.shape[1] % cpu_int4.CHUNK:
        return None
    entry = _HEAD_BLOCKS.get(id(w))
    if entry is None or entry[0]() is not w:
        key = id(w)

        def drop(ref: weakref.ref, key: int = key) -> None:  # only this weight's own entry (its id may be reused)
            if key in _HEAD_BLOCKS and _HEAD_BLOCKS[key][0] is ref:
                del _HEAD_BLOCKS[key]

        entry = _HEAD_BLOCKS[key] = (weakref.ref(w, drop), cpu_int4.pack_int8_blocks(w), head.scales.float().contiguous())
    return entry[1], entry[2]


def _enabled() -> bool:
    return os.environ.get("MODELCORE_FUSED_DECODE", "1").strip().lower() not in ("0", "false", "no", "off")


def supported(model) -> bool:
    """Whether `model`'s layers can run as one fused C step (see the module docstring)."""
    from modelcore.model import MLP, Attention
    from modelcore.quant import Int4Linear

    if not _enabled():
        return False
    args = model.args
    if model.device.type != "cpu" or args.attention != "gqa" or args.hidden_act != "silu" or cpu_int4.library() is None:
        return False
    groups = set()
    for layer in model.model.layers:
        att, mlp = layer.self_attn, layer.mlp
        if type(att) is not Attention or type(mlp) is not MLP or att.naive:
            return False
        mods = [getattr(att, "qkv_proj", None), att.o_proj, getattr(mlp, "gate_up_proj", None), mlp.down_proj]
        if not all(isinstance(m, Int4Linear) and _native(m) for m in mods) or any(m.bias is not None for m in mods[1:]):
            return False
        groups |= {m.group_size for m in mods}
        if att.rotary.table("cpu", torch.float32) is None:
            return False
    return len(groups) == 1


class FusedDecoder:
    """Decode steps over `cache` (a float32 KVCache list: generate's own, or an Engine's view of rows) through the C
    stack, for as many rows as the step is given (rows 0..B-1 of the cache).

    kernel: the built library to use (default: this CPU's; tests pass `cpu_int4.load("exact")`)."""

    def __init__(self, model, cache: list, kernel: cpu_int4.Kernel | None = None) -> None:
        lib = kernel or cpu_int4.library()
        assert lib is not None and supported(model), "the model does not fit the fused CPU decode step"
        self.model, self.lib, self.kernel = model, lib.lib, lib
        if lib.lib.mc_decode_fields() != len(FIELDS):
            raise RuntimeError("modelcore/csrc/decode_cpu.c and cpu_decode.py disagree on the layer table")
        a = model.args
        att0 = model.model.layers[0].self_attn
        k0 = cache[0].k
        self.rows, self.max_len = k0.shape[0], cache[0].max_len
        self.dims = (a.dim, att0.n_heads, att0.n_kv_heads, att0.head_dim, model.model.layers[0].mlp.down_proj.in_features,
                     att0.qkv_proj.group_size)
        self.eps, self.window, self.scale = float(a.rms_norm_eps), int(a.sliding_window or 0), float(att0.scale)
        self.cos, self.sin = att0.rotary.table("cpu", torch.float32)  # (P, hd) float32
        keep = []  # float32 copies the table points into (kept alive with it)
        rows, caches = [], []
        for layer, lc in zip(model.model.layers, cache):
            att, mlp = layer.self_attn, layer.mlp
            if lc.k.dtype != torch.float32 or lc.k.shape != k0.shape or not (lc.k.is_contiguous() and lc.v.is_contiguous()):
                raise ValueError("the fused decode step needs contiguous float32 caches of one shape")
            n1 = layer.input_layernorm.weight.detach().float().contiguous()
            n2 = layer.post_attention_layernorm.weight.detach().float().contiguous()
            qb = att.qkv_proj.bias.float().contiguous() if att.qkv_proj.bias is not None else None
            keep += [n1, n2] + ([qb] if qb is not None else [])
            rows.append([n1.data_ptr(), att.qkv_proj.blocks.data_ptr(), att.qkv_proj.block_scales.data_ptr(),
                         qb.data_ptr() if qb is not None else 0, att.o_proj.blocks.data_ptr(),
                         att.o_proj.block_scales.data_ptr(), n2.data_ptr(), mlp.gate_up_proj.blocks.data_ptr(),
                         mlp.gate_up_proj.block_scales.data_ptr(), mlp.down_proj.blocks.data_ptr(),
                         mlp.down_proj.block_scales.data_ptr()])
            caches.append([lc.k.data_ptr(), lc.v.data_ptr()])
        self.table = torch.tensor(rows, dtype=torch.int64)
        self.caches = torch.tensor(caches, dtype=torch.int64)
        self.row_stride = k0[0].numel()
        self.final_norm = model.model.norm.weight.detach().float().contiguous()
        self._keep = keep
        # the cache is held weakly (the slot below keeps decoders past their generate call); the C step writes into
        # these very k/v tensors, so a decoder whose layers or tensors are gone or replaced is refused, not run
        self._refs = [(weakref.ref(lc), weakref.ref(lc.k), weakref.ref(lc.v)) for lc in cache]
        fn = lib.lib.mc_llama_decode
        fn.restype = ctypes.c_int
        i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
        fn.argtypes = [ptr, ptr, ctypes.c_int, i64, i64, i64, i64, i64, i64, i64, i64, i64, f32, i64, f32, ptr, ptr, ptr,
                       ptr, ptr, ptr, ptr, ctypes.c_int]
        self._fn = fn

    def serves(self, cache: list) -> bool:
        """True when `cache` is the very cache this decoder was built for, with the same k/v tensors."""
        if len(cache) != len(self._refs):
            return False
        for lc, (rc, rk, rv) in zip(cache, self._refs):
            if rc() is not lc or rk() is not lc.k or rv() is not lc.v:
                return False
        return True

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor | int,
               cache_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, 1, D) float32 of `tokens` (B,) at `positions` (B,); writes each row's K/V at
        its position in cache row b, or in `cache_rows[b]` when given: rows that share a cache row are consecutive
        tokens of one sequence, attended causally (a prefill of several prompts at once, without padding)."""
        d, hq, hkv, hd, inter, group = self.dims
        tokens = tokens.reshape(-1)
        b = tokens.shape[0]
        pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1).contiguous()
        if cache_rows is not None:
            cache_rows = torch.as_tensor(cache_rows, dtype=torch.int64).reshape(-1).contiguous()
            if cache_rows.shape[0] != b or int(cache_rows.min()) < 0 or int(cache_rows.max()) >= self.rows:
                raise ValueError(f"cache_rows must give each of the {b} tokens a row in 0..{self.rows - 1}")
        elif b > self.rows:
            raise ValueError(f"{b} tokens, {pos.shape[0]} positions, {self.rows} cache rows")
        if pos.shape[0] != b:
            raise ValueError(f"{b} tokens, {pos.shape[0]} positions, {self.rows} cache rows")
        lo, hi = int(pos.min()), int(pos.max())
        if lo < 0 or hi >= min(self.max_len, self.cos.shape[0]):
            raise ValueError(f"positions {lo}..{hi} outside the cache ({self.max_len}) or the RoPE table ({self.cos.shape[0]})")
        layers = [rc() for rc, _, _ in self._refs]
        if any(lc is None for lc in layers) or not self.serves(layers):
            raise RuntimeError("the KV cache this decoder was built for is gone or its tensors were replaced")
        h = self.model.model.embed_tokens(tokens.view(b, 1)).float().contiguous().view(b, d)
        out = torch.empty(b, d, dtype=torch.float32)
        rc = self._fn(self.table.data_ptr(), self.caches.data_ptr(), self.table.shape[0], b, d, hq, hkv, hd, inter, group,
                      self.max_len, self.row_stride, self.eps, self.window, self.scale, self.cos.data_ptr(),
                      self.sin.data_ptr(), pos.data_ptr(), cache_rows.data_ptr() if cache_rows is not None else None,
                      h.data_ptr(), self.final_norm.data_ptr(), out.data_ptr(), torch.get_num_threads())
        if rc:
            raise RuntimeError(f"fused decode step failed (code {rc})")
        return out.view(b, 1, d)

    def logits(self, tokens: torch.Tensor, positions: torch.Tensor | int, cache_rows: torch.Tensor | None = None,
               rows: torch.Tensor | list[int] | None = None) -> torch.Tensor:
        """Logits (R, V) of the next token after each of `rows` (default: every row), float32 when the head runs on
        the native kernel (float32 in and out: no rounding to bf16 and back on the way). cache_rows: as `hidden`."""
        h = self.hidden(tokens, positions, cache_rows)
        if rows is not None:
            h = h[torch.as_tensor(rows, dtype=torch.long)]
        head = self.model.lm_head
        blocked = head_blocks(head, self.kernel)
        if blocked is not None:
            y = self.kernel.int8_blocked_matmul(h.reshape(h.shape[0], -1).contiguous(), *blocked)
            return y if head.bias is None else y + head.bias
        return head(h if getattr(head, "kernel", None) == "native" else h.to(self.model.dtype))[:, -1]


class _Slot:
    """Where a model keeps its FusedDecoders (one per cache it decodes over, the last few): copies and pickles of the
    model get an empty slot (a decoder holds raw addresses of this model's tensors)."""

    KEEP = 16  # an Engine decodes over one view of its cache per active-row count

    def __init__(self) -> None:
        self.decs: dict[int, tuple] = {}  # id(cache[0]) -> (weakref to cache[0], decoder or None: the torch path)

    def __deepcopy__(self, memo: dict) -> "_Slot":
        return _Slot()

    def __reduce__(self):
        return (_Slot, ())


def fused_decoder(model, cache: list) -> FusedDecoder | None:
    """The FusedDecoder for this (model, cache), or None when the model does not fit; decided and built once per
    cache (a generate call's own, or an Engine's view of its rows), not on every decoding step. The slot holds its
    caches weakly (by their first layer), so a finished generate call's cache is freed, and its decoder, which
    points into it, is never matched again."""
    if not cache or not _enabled():
        return None
    slot = model.__dict__.setdefault("_fused_decoder", _Slot())
    key = id(cache[0])
    entry = slot.decs.get(key)
    if entry is not None and entry[0]() is cache[0] and (entry[1].serves(cache) if entry[1] is not None else True):
        return entry[1]
    slot.decs.pop(key, None)
    while len(slot.decs) >= slot.KEEP:
        slot.decs.pop(next(iter(slot.decs)))
    dec = FusedDecoder(model, cache) if supported(model) else None
    slot.decs[key] = (weakref.ref(cache[0]), dec)
    return dec


FUSED_PREFILL_MAX_TOKENS = 256  # longer inputs keep the torch path (from 512 rows its int4 layers use a dense GEMM)


def fused_prefill(model, cache: list, prompts: list[list[int]], starts: list[int] | None = None,
                  rows: list[int] | None = None) -> torch.Tensor | None:
    """Prefill prompts through the fused C step in one call, each into its own cache row, without padding: prompt i's
    tokens from starts[i] (earlier positions already in the cache, e.g. a reused prefix) go to cache row rows[i]
    (default i) at their own positions, attended causally. Returns the logits (len(prompts), V) after each prompt's
    last token, or None when the fused path does not apply (not a CPU model it fits, or more than
    FUSED_PREFILL_MAX_TOKENS tokens in all): the caller then runs the torch forward."""
    starts = starts or [0] * len(prompts)
    rows = rows if rows is not None else list(range(len(prompts)))
    if not prompts or any(len(p) - s < 1 for p, s in zip(prompts, starts)):
        return None
    if sum(len(p) - s for p, s in zip(prompts, starts)) > FUSED_PREFILL_MAX_TOKENS:
        return None
    dec = fused_decoder(model, cache)
    if dec is None:
        return None
    toks: list[int] = []
    pos: list[int] = []
    crow: list[int] = []
    last: list[int] = []
    for ids, s, r in zip(prompts, starts, rows):
        toks += ids[s:]
        pos += range(s, len(ids))
        crow += [r] * (len(ids) - s)
        last.append(len(toks) - 1)
    return dec.logits(torch.tensor(toks, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                      torch.tensor(crow, dtype=torch.long), last)
