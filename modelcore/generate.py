"""Text generation as plain functions: prefill, decode_one_token, sample, generate, stream.

Batched prompts may have different lengths (any padding side): each row keeps its own positions and its
own KV-cache slots, so a batch gives the same greedy tokens as each prompt alone.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from modelcore.errors import GenerationConfigError, PromptError
from modelcore.model import positions_from_mask


@dataclass
class SamplingParams:
    """Validated decoding options."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    stop_strings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature is None or self.temperature < 0:
            raise GenerationConfigError(f"temperature must be >= 0, got {self.temperature!r}")
        if self.top_p is None or not (0 < self.top_p <= 1):
            raise GenerationConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k is None or self.top_k < 0 or int(self.top_k) != self.top_k:
            raise GenerationConfigError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.repetition_penalty is None or self.repetition_penalty <= 0:
            raise GenerationConfigError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise GenerationConfigError("stop_strings must be non-empty strings")
        if self.temperature == 0:
            self.do_sample = False


def sample(logits: torch.Tensor, *, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next ids (B,) from logits (B, V): argmax, or temperature / top-k / top-p sampling."""
    if not params.do_sample:
        return logits.argmax(-1)
    logits = logits.float() / max(params.temperature, 1e-5)
    if params.top_k:
        k = min(int(params.top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest set reaching top_p (first always kept)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on ids already seen (seen: (B, V) bool): positive logits divided, negative multiplied."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the prompt through the model once, filling `cache`; returns (last-token logits (B, V), next positions (B,)).

    On a CPU model that fits the fused C step, a short prompt batch runs through it in one call (cpu_decode.fused_prefill)."""
    positions = positions_from_mask(attention_mask)  # (B, T)
    if input_ids.device.type == "cpu":
        from modelcore.cpu_decode import fused_prefill

        mask = attention_mask.bool()
        prompts = [input_ids[i][mask[i]].tolist() for i in range(input_ids.shape[0])]
        logits = fused_prefill(model, cache, prompts)  # real tokens at positions 0..len-1, as positions_from_mask gives
        if logits is not None:
            return logits, attention_mask.long().sum(-1)
    if bool(attention_mask.all()):  # no padding: positions 0..T-1, the model may use its causal kernel
        hidden = model.forward_hidden(input_ids, cache=cache)  # (B, T, D)
    else:
        hidden = model.forward_hidden(input_ids, positions=positions, cache=cache)  # (B, T, D)
    last = torch.where(attention_mask.bool(), positions, -1).argmax(-1)  # index of each row's last real token
    h_last = hidden[torch.arange(hidden.shape[0]), last]  # (B, D)
    return model.lm_head(h_last), attention_mask.long().sum(-1)


def decode_one_token(model, tokens: torch.Tensor, positions: torch.Tensor, cache: list) -> torch.Tensor:
    """One decoding step for every row: tokens (B,) at positions (B,) -> logits (B, V).

    On a CPU model that fits, the whole layer stack runs as one C call (modelcore/cpu_decode.py)."""
    if tokens.device.type == "cpu":
        from modelcore.cpu_decode import fused_decoder

        fused = fused_decoder(model, cache)
        if fused is not None:
            return fused.logits(tokens, positions)
    out = model(tokens[:, None], positions=positions[:, None], cache=cache)
    return out.logits[:, -1]


class GraphDecoder:
    """CUDA decode step for a fixed batch size over a static KV cache, captured once as a CUDA graph and replayed.

    The step reads its inputs from static buffers (tokens, positions), writes K/V at the positions with a scatter
    and attends over all `max_len` cache slots under the causal mask (slots past a row's position are hidden), so
    it has fixed shapes and no host reads: one graph launch per token instead of hundreds of kernel launches.
    Built and cached by `graph_decoder(model, batch, need)`; prefill writes into `.cache` with the eager model.
    """

    def __init__(self, model, batch: int, max_len: int, cache: list | None = None, compiled: bool = False):
        self.model, self.batch, self.max_len = model, batch, max_len
        self.cache = cache if cache is not None else model.new_cache(batch, max_len)
        self.tokens = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=model.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.blocks = compiled_blocks(model) if compiled else None

    def _step(self) -> torch.Tensor:
        h = self.model.forward_hidden(self.tokens[:, None], positions=self.positions[:, None], cache=self.cache,
                                      kv_len=self.max_len, blocks=self.blocks)  # (B, 1, D)
        return self.model.lm_head(h[:, -1])  # (B, V)

    def _capture(self) -> None:
        # warm-up runs (same inputs: they write the same K/V the real step writes) compile, load kernels and tables
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._step()
        self.graph = graph

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (B, V) for tokens (B,) at positions (B,); K/V land in self.cache. Valid until the next call."""
        self.tokens.copy_(tokens)
        self.positions.copy_(positions)
        if self.graph is None:
            try:
                self._capture()
            except Exception:  # noqa: BLE001 - a compiler failure must not stop generation: capture the eager blocks
                if self.blocks is None:
                    raise
                import logging

                logging.getLogger(__name__).warning("torch.compile of the decode step failed; using eager blocks",
                                                    exc_info=True)
                self.blocks = None
                self.model.__dict__["_compiled_blocks"] = None
                self._capture()
        self.graph.replay()
        return self.logits


def compiled_blocks(model) -> list | None:
    """The model's blocks through torch.compile (Inductor fuses each block's small ops; identical blocks share one
    compiled graph), built once per model; None when compilation is off or failed before."""
    if "_compiled_blocks" not in model.__dict__:
        model.__dict__["_compiled_blocks"] = [torch.compile(layer, dynamic=False) for layer in model.model.layers]
    return model.__dict__["_compiled_blocks"]


def use_cuda_graphs(model) -> bool:
    """CUDA graphs for decoding: on CUDA, unless $MODELCORE_CUDA_GRAPHS=0 or model.cuda_graphs is False, and only
    when every layer decodes without host reads (MoE: experts packed for the grouped/GEMV dispatch, which needs
    bfloat16 plain-Linear experts and the "dispatch" routing; packs them on first use)."""
    if model.device.type != "cuda" or not getattr(model, "cuda_graphs", True) or os.environ.get("MODELCORE_CUDA_GRAPHS", "1") == "0":
        return False
    from modelcore.moe import MoE, pack_experts

    pack_experts(model)
    return all(m.routing == "dispatch" and m.packed is not None and model.dtype == torch.bfloat16
               for m in model.modules() if isinstance(m, MoE))


def use_compile(model) -> bool:
    """torch.compile the graphed decode step's blocks: on by default, off with $MODELCORE_COMPILE=0 or
    model.compile_decode = False (compiling takes tens of seconds once per process and shape)."""
    return getattr(model, "compile_decode", True) and os.environ.get("MODELCORE_COMPILE", "1") != "0"


def graph_decoder(model, batch: int, need: int) -> GraphDecoder:
    """The model's GraphDecoder for `batch` rows and at least `need` cache slots (lengths bucketed to 256 so
    graphs are reused across calls; the last two built are kept)."""
    bucket = min(-(-need // 256) * 256, model.args.max_position_embeddings)
    bucket = max(bucket, need)
    graphs: dict = model.__dict__.setdefault("_graph_decoders", {})
    key = (batch, bucket)
    dec = graphs.get(key)
    if dec is None:
        while len(graphs) >= 2:
            graphs.pop(next(iter(graphs)))
        torch.cuda.empty_cache()
        dec = graphs[key] = GraphDecoder(model, batch, bucket, compiled=use_compile(model))
    else:
        graphs[key] = graphs.pop(key)  # most recently used last
    return dec


def _params(model, tokenizer, prompt_len: int, max_new_tokens: int | None, max_length: int | None, do_sample: bool | None,
            temperature: float | None, top_k: int | None, top_p: float | None, repetition_penalty: float | None,
            seed: int | None, eos_token_id: int | list[int] | None, stop_strings: str | list[str] | None) -> SamplingParams:
    """Merge call options with the model's defaults into validated SamplingParams."""
    if max_new_tokens is None:
        max_new_tokens = (max_length - prompt_len) if max_length is not None else 128
        if max_length is not None and max_new_tokens < 1:
            raise GenerationConfigError(f"max_length={max_length} leaves no room after the {prompt_len}-token prompt")
    if do_sample is None:
        do_sample = any(x is not None for x in (temperature, top_k, top_p)) and temperature != 0
    if eos_token_id is None:
        eos = list(model.args.eos_token_id)
        if not eos and tokenizer is not None and tokenizer.eos_token_id is not None:
            eos = [tokenizer.eos_token_id]
    else:
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return SamplingParams(
        max_new_tokens=max_new_tokens, do_sample=bool(do_sample), temperature=1.0 if temperature is None else temperature,
        top_k=0 if top_k is None else top_k, top_p=1.0 if top_p is None else top_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty, seed=seed, eos_token_ids=eos,
        stop_strings=[stop_strings] if isinstance(stop_strings, str) else list(stop_strings or []))


def _prepare(model, input_ids: torch.Tensor | str | list[str] | None, attention_mask: torch.Tensor | None,
             tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids + mask as (B, T) long tensors on the model's device; strings are tokenized; empty prompts rejected."""
    if input_ids is None:
        raise PromptError("no prompt given (input_ids is None)")
    if isinstance(input_ids, (str, list)) and (isinstance(input_ids, str) or (input_ids and isinstance(input_ids[0], str))):
        if tokenizer is None:
            raise PromptError("a text prompt needs a tokenizer (load the model with AutoModel.from_pretrained on a folder)")
        enc = tokenizer(input_ids, return_tensors="pt")
        input_ids, attention_mask = enc["input_ids"], enc["attention_mask"]
    input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.numel() == 0 or input_ids.shape[1] == 0:
        raise PromptError(f"empty prompt: input_ids has shape {tuple(input_ids.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = torch.as_tensor(attention_mask, dtype=torch.long).reshape(input_ids.shape)
    lengths = attention_mask.sum(-1)
    if bool((lengths == 0).any()):
        raise PromptError(f"empty prompt in batch rows {torch.nonzero(lengths == 0).flatten().tolist()}")
    if bool(((input_ids < 0) | (input_ids >= model.args.vocab_size)).any()):
        raise PromptError(f"input_ids contain ids outside the vocabulary [0, {model.args.vocab_size})")
    max_pos = model.args.max_position_embeddings
    if int(lengths.max()) > max_pos:
        raise PromptError(f"prompt of {int(lengths.max())} tokens is longer than the model's context "
                          f"(max_position_embeddings={max_pos})")
    return input_ids.to(model.device), attention_mask.to(model.device)


class _StopWatch:
    """Per-row text of the new tokens, to detect stop strings and cut them out."""

    def __init__(self, tokenizer, stops: list[str]):
        from modelcore.tokenizer import IncrementalDecoder

        self.stops = stops
        self.dec = IncrementalDecoder(tokenizer, skip_special_tokens=False)
        self.text = ""
        self.lengths: list[int] = []  # text length after each token
        self.hit: int | None = None  # char index where a stop string starts

    def push(self, token_id: int) -> bool:
        """Add a token; True when a stop string is complete."""
        self.text += self.dec.push(token_id)
        self.lengths.append(len(self.text))
        window = self.text[-(max(len(x) for x in self.stops) + self.lengths[-1] - (self.lengths[-2] if len(self.lengths) > 1 else 0)):]
        for s in self.stops:
            j = window.find(s)
            if j >= 0:
                start = len(self.text) - len(window) + j
                self.hit = start if self.hit is None else min(self.hit, start)
        return self.hit is not None

    def tokens_to_keep(self) -> int:
        """How many new tokens decode to text lying wholly before the stop string."""
        assert self.hit is not None
        return sum(1 for n in self.lengths if n <= self.hit)


def generate_steps(*, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, params: SamplingParams,
                   tokenizer=None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (next ids (B,), active-before-this-step (B,) bool), both on the CPU, per step; the caller stops
    consuming when done.

    One device-to-host read per token. With a CUDA graph the next step is launched before that read, so the GPU
    computes token n+1 while the host streams token n (one extra step may run after the last one: harmless).
    """
    b, t = input_ids.shape
    max_pos = model.args.max_position_embeddings
    lengths = attention_mask.sum(-1)
    budget = min(params.max_new_tokens, max_pos - int(lengths.max()))
    if budget < 1:
        raise PromptError(f"the prompt fills the whole context ({max_pos} tokens); nothing can be generated")
    need = max(t, int(lengths.max()) + budget)
    graph = graph_decoder(model, b, need) if use_cuda_graphs(model) else None
    cache = graph.cache if graph is not None else model.new_cache(b, need)
    gen = torch.Generator(device=model.device).manual_seed(params.seed) if params.seed is not None else None
    vocab = model.args.vocab_size
    penalty = params.repetition_penalty != 1.0
    seen = torch.zeros(b, vocab + 1, dtype=torch.bool, device=model.device) if penalty else None
    if seen is not None:
        seen.scatter_(1, torch.where(attention_mask.bool(), input_ids, vocab), True)
    eos = torch.tensor(params.eos_token_ids or [-1])
    active = torch.ones(b, dtype=torch.bool)
    rows = torch.arange(b, device=model.device)
    host = torch.empty(b, dtype=torch.long, pin_memory=graph is not None)
    ready = torch.cuda.Event() if graph is not None else None
    with torch.inference_mode():
        logits, pos = prefill(model, input_ids, attention_mask, cache)
        for step in range(budget):
            if seen is not None:
                logits = apply_repetition_penalty(logits[:, :vocab], seen[:, :vocab], params.repetition_penalty)
            nxt = sample(logits[:, :vocab], params=params, generator=gen)  # (B,) on the device
            if seen is not None:
                seen[rows, nxt] = True
            if ready is not None:  # CUDA: queue the read, launch the next step, then wait for the read only
                host.copy_(nxt, non_blocking=True)
                ready.record()
                if step < budget - 1:
                    logits = graph(nxt, pos)
                    pos = pos + 1
                ready.synchronize()
            else:
                host.copy_(nxt)
            nxt_c = host.clone()
            yield nxt_c, active.clone()
            active &= ~torch.isin(nxt_c, eos)
            if not bool(active.any()) or step == budget - 1:
                return
            if ready is None:
                logits = decode_one_token(model, nxt, pos, cache)
                pos = pos + 1


def generate(*, model, input_ids: torch.Tensor | str | list[str] | None = None, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, seed: int | None = None, eos_token_id: int | list[int] | None = None,
             stop_strings: str | list[str] | None = None, streamer: Any = None, tokenizer: Any = None,
             pad_token_id: int | None = None, **unused: Any) -> torch.Tensor:
    """Prompt + generated ids (B, T + new); rows that finish early are padded with pad_token_id.

    Greedy by default; sampling when do_sample=True or temperature/top_k/top_p are given (temperature=0 -> greedy).
    Stops at eos ids (config + generation_config), at stop strings (the tokens that reach into the stop string
    are cut off), or after max_new_tokens (or max_length in total). `streamer`: a callable(str) or an object with
    put(str) [and end()], fed text pieces as they are produced (one prompt only).
    """
    if unused:
        raise GenerationConfigError(f"unknown generate() options: {sorted(unused)}")
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    ids, mask = _prepare(model, input_ids, attention_mask, tokenizer)
    params = _params(model, tokenizer, ids.shape[1], max_new_tokens, max_length, do_sample, temperature, top_k, top_p,
                     repetition_penalty, seed, eos_token_id, stop_strings)
    if (params.stop_strings or streamer is not None) and tokenizer is None:
        raise GenerationConfigError("stop_strings and streamer need a tokenizer")
    text_stream, put = None, None
    if streamer is not None:
        if ids.shape[0] != 1:
            raise GenerationConfigError("a streamer works on one prompt at a time")
        put = streamer.put if hasattr(streamer, "put") else streamer
        text_stream = TextStream(tokenizer, params)
    pad = pad_token_id if pad_token_id is not None else (model.args.pad_token_id if model.args.pad_token_id is not None else
                                                         (params.eos_token_ids[0] if params.eos_token_ids else 0))
    b = ids.shape[0]
    watches = [_StopWatch(tokenizer, params.stop_strings) for _ in range(b)] if params.stop_strings else None
    eos = torch.tensor(params.eos_token_ids or [-1])
    new: list[torch.Tensor] = []
    stopped = torch.zeros(b, dtype=torch.bool)
    keep: list[int | None] = [None] * b
    for nxt, active in generate_steps(model=model, input_ids=ids, attention_mask=mask, params=params, tokenizer=tokenizer):
        nxt_c, live = nxt.cpu(), active.cpu() & ~stopped
        new.append(torch.where(live, nxt_c, torch.full_like(nxt_c, pad)))
        if text_stream is not None and live[0]:
            piece = text_stream.push(int(nxt_c[0]))
            if piece:
                put(piece)
        if watches:
            for r in range(b):
                if live[r] and watches[r].push(int(nxt_c[r])):
                    stopped[r], keep[r] = True, watches[r].tokens_to_keep()
        if not bool((live & ~torch.isin(nxt_c, eos) & ~stopped).any()):
            break
    if text_stream is not None:
        piece = text_stream.finish()
        if piece:
            put(piece)
        if hasattr(streamer, "end"):
            streamer.end()
    out = torch.stack(new, dim=1)  # (B, new)
    for r, k in enumerate(keep):
        if k is not None:
            out[r, k:] = pad
    if all(k is not None for k in keep):  # every row hit a stop string: drop the all-padding tail
        out = out[:, :max(keep)]
    return torch.cat([ids, out.to(ids.device)], dim=1)


class TextStream:
    """Ids -> text pieces for one row: whole UTF-8 characters only, eos skipped, stop strings held back and cut."""

    def __init__(self, tokenizer: Any, params: SamplingParams):
        from modelcore.tokenizer import IncrementalDecoder

        self.dec = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stops, self.eos = params.stop_strings, set(params.eos_token_ids)
        self.pending = ""
        self.done = False

    def push(self, token_id: int) -> str:
        """Feed one id; return the text that is now final ('' while undecided)."""
        if self.done:
            return ""
        if token_id in self.eos:
            self.done = True
            return self.finish()
        self.pending += self.dec.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Flush what is left at the end of generation."""
        if not self.done:
            self.pending += self.dec.flush()
        self.done = True
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending, self.done = self.pending[:min(hits)], "", True
            return out
        hold = 0 if final else _stop_prefix_len(self.pending, self.stops)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out


def stream(*, model, input_ids: torch.Tensor | str | None = None, attention_mask: torch.Tensor | None = None,
           tokenizer: Any = None, **options: Any) -> Iterator[str]:
    """Yield the text of one prompt's continuation piece by piece as tokens are produced (same options as generate)."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise GenerationConfigError("streaming needs a tokenizer")
    ids, mask = _prepare(model, input_ids, attention_mask, tokenizer)
    if ids.shape[0] != 1:
        raise GenerationConfigError("stream() takes one prompt; use generate() for batches")
    params = _params(model, tokenizer, ids.shape[1], options.pop("max_new_tokens", None), options.pop("max_length", None),
                     options.pop("do_sample", None), options.pop("temperature", None), options.pop("top_k", None),
                     options.pop("top_p", None), options.pop("repetition_penalty", None), options.pop("seed", None),
                     options.pop("eos_token_id", None), options.pop("stop_strings", None))
    if options:
        raise GenerationConfigError(f"unknown stream() options: {sorted(options)}")
    text = TextStream(tokenizer, params)
    for nxt, _ in generate_steps(model=model, input_ids=ids, attention_mask=mask, params=params, tokenizer=tokenizer):
        piece = text.push(int(nxt[0]))
        if piece:
            yield piece
        if text.done:
            return
    piece = text.finish()
    if piece:
        yield piece


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string (must be held back)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                best = max(best, n)
                break
    return best
