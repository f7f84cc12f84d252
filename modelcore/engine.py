"""Continuous-batching generation Engine: one model per process, many concurrent streaming requests.

A background thread owns the model and a static KV cache of ``max_batch`` rows (request slots). Each step it
(1) drops cancelled requests, (2) admits waiting requests into free rows: their prompts are prefilled together in
right-padded forwards (prompts of similar length grouped, see ``prefill_groups``), and the leading tokens a prompt
shares with the last prefilled one (a chat template's system prompt) are copied from a one-prompt prefix store
instead of being computed again, (3) decodes one token for every active row in one batched forward, (4) streams
text to each request and frees finished rows. Active requests always occupy rows ``0..n-1``: a freed row is
filled by copying the last row into it, so the batched decode runs on a contiguous view of the cache.

    eng = Engine.get()                       # $KD_GENERATOR_MODEL or the bundled SmolLM2 GGUF, loaded once
    req = eng.submit(messages=[{"role": "user", "content": "Hi"}], max_new_tokens=64)
    for piece in req: print(piece, end="")   # raises the request's error, if any, at the end
"""
from __future__ import annotations

import copy
import os
import queue
import threading
from collections import deque
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from modelcore.cpu_decode import FUSED_PREFILL_MAX_TOKENS, fused_prefill
from modelcore.errors import GenerationConfigError, PromptError
from modelcore.generate import (GraphDecoder, SamplingParams, apply_repetition_penalty, decode_one_token, sample, use_compile,
                               use_cuda_graphs)

_END = object()


class Request:
    """One generation request: iterate it for text pieces; ``text``, ``finish_reason``, ``error`` when done."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, *, budget: int):
        self.prompt_ids = prompt_ids
        self.params = params
        self.budget = budget  # new tokens allowed (max_new_tokens capped by the context)
        self.text = ""
        self.finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
        self.error: BaseException | None = None
        self.n_tokens = 0
        self._pieces: queue.SimpleQueue = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._drained = False

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Ask the Engine to stop this request; its slot is freed at the next step."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until finished; True if it finished within `timeout`."""
        return self._done.wait(timeout)

    def __iter__(self) -> Iterator[str]:
        """Text pieces as produced; blocks for the next one; raises the request's error after the last piece."""
        while not self._drained:
            item = self._pieces.get()
            if item is _END:
                self._drained = True
                break
            yield item
        if self.error is not None:
            raise self.error

    # worker side
    def emit(self, piece: str) -> None:
        if piece:
            self.text += piece
            self._pieces.put(piece)

    def finish(self, reason: str) -> None:
        if not self._done.is_set():
            self.finish_reason = reason
            self._done.set()
            self._pieces.put(_END)

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self.finish("error")


class RowState:
    """Decoding state of an admitted request: next position, last token, sampling RNG, text held back for stops."""

    def __init__(self, req: Request, tokenizer: Any, vocab: int, *, device: torch.device):
        from modelcore.tokenizer import IncrementalDecoder

        self.req = req
        self.pos = len(req.prompt_ids)  # where the next fed token goes
        self.last = -1
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.pending = ""  # decoded text not yet emitted (could start a stop string)
        p = req.params
        self.seen = None
        if p.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab + 1, dtype=torch.bool, device=device)
            self.seen[torch.tensor(req.prompt_ids, device=device)] = True
        self.generator = None
        if p.do_sample:
            seed = p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,)))
            self.generator = torch.Generator(device=device).manual_seed(seed)
        self.eos = set(p.eos_token_ids)
        self.result: str | None = None  # finish reason once push() returned True
        self.max_stop = max((len(x) for x in p.stop_strings), default=0)

    def push(self, token: int) -> bool:
        """Account one sampled token; stream its text; True when the request is finished."""
        req = self.req
        if req.cancelled:
            return self._end("cancelled", "")
        req.n_tokens += 1
        if token in self.eos:
            return self._end("stop", self.pending + self.decoder.flush())
        if self.seen is not None:
            self.seen[token] = True
        self.pending += self.decoder.push(token)
        if self.max_stop:
            window_start = max(0, len(req.text) - self.max_stop)
            full = req.text + self.pending
            hits = [j for j in (full.find(s, window_start) for s in req.params.stop_strings) if j >= 0]
            if hits:
                return self._end("stop", full[len(req.text):min(hits)])
        if req.n_tokens >= req.budget:  # a character cut in half by the limit is dropped, not shown as U+FFFD
            return self._end("length", (self.pending + self.decoder.flush()).rstrip("\ufffd"))
        hold = self._held_suffix()
        req.emit(self.pending[: len(self.pending) - hold])
        self.pending = self.pending[len(self.pending) - hold:]
        if self.last >= 0:  # the previous token was fed at self.pos; this one goes next
            self.pos += 1
        self.last = token
        return False

    def _held_suffix(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        full = self.req.text + self.pending
        for k in range(min(self.max_stop - 1, len(self.pending)), 0, -1):
            if any(s.startswith(full[-k:]) for s in self.req.params.stop_strings):
                return k
        return 0

    def _end(self, reason: str, tail: str) -> bool:
        """Emit the last text; the Engine signals the finish once the row is freed."""
        self.req.emit(tail)
        self.result = reason
        return True


def prompt_ids(tokenizer: Any, prompt: str | None, messages: list[dict] | None) -> list[int]:
    """Token ids of a plain prompt or of chat messages rendered with the checkpoint's template."""
    if (prompt is None) == (messages is None):
        raise PromptError("give exactly one of prompt= or messages=")
    if messages is not None:
        if not isinstance(messages, list) or not messages or any(
            not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise PromptError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        if not isinstance(prompt, str):
            raise PromptError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = tokenizer.encode(prompt) if prompt else []
    if not ids:
        raise PromptError("empty prompt")
    return list(ids)


def build_params(*, max_new_tokens: int, temperature: float, top_p: float, top_k: int, repetition_penalty: float,
                 seed: int | None, stop: list[str] | str | None, eos: list[int]) -> SamplingParams:
    """Validated sampling options (GenerationConfigError with a clear message otherwise)."""
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and not isinstance(stops, (list, tuple)):
        raise GenerationConfigError(f"stop must be a list of strings, got {type(stop).__name__}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("repetition_penalty", repetition_penalty)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise GenerationConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(max_new_tokens, bool) or isinstance(top_k, bool) or not isinstance(top_k, int):
        raise GenerationConfigError(f"max_new_tokens and top_k must be integers, got {max_new_tokens!r}, {top_k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise GenerationConfigError(f"seed must be an integer or None, got {seed!r}")
    return SamplingParams(max_new_tokens=max_new_tokens, do_sample=temperature > 0, temperature=float(temperature),
                          top_k=top_k, top_p=float(top_p), repetition_penalty=float(repetition_penalty), seed=seed,
                          eos_token_ids=list(eos), stop_strings=list(stops or []))


def rows_view(cache: list, start: int, stop: int) -> list:
    """Per-layer caches restricted to rows [start, stop) (views: writes land in the full cache)."""
    out = []
    for layer in cache:
        batch = layer.batch
        view = copy.copy(layer)
        for name, value in vars(layer).items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
                setattr(view, name, value[start:stop])
        out.append(view)
    return out


PREFIX_MIN_TOKENS = 8  # reuse a cached prompt prefix from this many shared tokens on
PREFILL_FORWARD_TOKENS = 8  # one extra prefill forward costs about as much as this many padded tokens (CPU, SmolLM2)


def prefill_groups(lengths: list[int], overhead: int = PREFILL_FORWARD_TOKENS) -> list[list[int]]:
    """Split prompts (indices into `lengths`) into prefill batches: a batch costs `overhead` + rows x its longest
    prompt (right padding), so prompts are sorted by length and cut where that total is smallest (exact DP)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0] + [0] * n  # best[j]: cheapest cost of the first j sorted prompts
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = min((best[i] + overhead + (j - i) * lengths[order[j - 1]], i) for i in range(j))
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Number of leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """Index of each row's largest logit (the first on ties; a NaN counts as largest, as in torch). A float32 CPU
    tensor goes through numpy: one thread, ~18 us for 8 x 49,152 where torch's argmax spent ~115 us starting its
    thread pool between two decode steps."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return logits.numpy().argmax(-1).tolist()
    return logits.argmax(-1).tolist()


def copy_cache_row(cache: list, src: int, dst: int, length: int | None = None) -> None:
    """Move request row `src` into row `dst` in every layer: its slots 0..length-1 (default all); the later ones hold
    nothing yet (each decode step writes its slot before reading it)."""
    for layer in cache:
        layer.copy_row(src, dst, length)


class Engine:
    """Thread-safe continuous-batching server around one decoder model."""

    _registry: ClassVar[dict[tuple, "Engine"]] = {}
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_batch: int = 8, max_len: int = 2048, name: str = "",
                 prefill: str = "batched"):
        """prefill: "batched" (admitted prompts share right-padded forwards) or "single" (one forward per prompt, with
        explicit positions: the behaviour before batched prefill, kept for A/B benchmarks)."""
        if tokenizer is None:
            raise ValueError("the Engine needs a tokenizer (load a folder with tokenizer.json, or a .gguf)")
        if max_batch < 1 or max_len < 2:
            raise ValueError(f"max_batch must be >= 1 and max_len >= 2, got {max_batch}, {max_len}")
        if prefill not in ("batched", "single"):
            raise ValueError(f"prefill must be 'batched' or 'single', got {prefill!r}")
        self.prefill = prefill
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch = max_batch
        self.max_context = min(max_len, model.args.max_position_embeddings)
        eos = list(model.args.eos_token_id) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.eos_token_ids = eos
        self._cache = model.new_cache(max_batch, self.max_context)
        self._views: dict[tuple[int, int], list] = {}  # rows_view of the cache per (start, stop): built once
        self.prefill_overhead = PREFILL_FORWARD_TOKENS  # grouping cost of one more prefill forward (see prefill_groups)
        self.prefill_forwards = 0  # prefill forwards run so far (tests, benchmarks)
        self.prefix_tokens_reused = 0  # prompt tokens whose K/V came from the prefix store instead of a forward
        # prefix store: the K/V of the last prefilled prompt (per layer (Hkv, P, D) copies); a new prompt sharing its
        # first tokens (a chat template's system prompt, a RAG preamble) copies them instead of recomputing them.
        # K/V at positions 0..c-1 depend only on tokens 0..c-1 (causal), so the copy is what a forward would write.
        from modelcore.cache import KVCache

        self.prefix_reuse = prefill == "batched" and all(type(layer) is KVCache for layer in self._cache)
        self._prefix_ids: list[int] = []
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        # CPU models that fit the fused C step prefill admitted prompts in one call, without padding
        # (modelcore/cpu_decode.py fused_prefill); the torch forward otherwise, and for long prompts
        from modelcore.cpu_decode import supported

        self._fused_prefill = prefill == "batched" and model.device.type == "cpu" and supported(model) and \
            all(type(layer) is KVCache for layer in self._cache)
        self._graphs: dict[int, GraphDecoder] = {}  # CUDA: captured decode step per number of active rows
        self._use_graphs = use_cuda_graphs(model)
        self._rows: list[RowState] = []  # active requests; index == cache row
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name=f"modelcore-engine-{name}", daemon=True)
        self._thread.start()

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def get(cls, path: str | Path | None = None, quantization: str | None = None, *, max_batch: int = 8,
            max_len: int = 2048, dtype: str | None = None, attention: str | None = None,
            routing: str | None = None) -> "Engine":
        """The process-wide Engine for (path, quantization, dtype, attention, routing), loaded on first use (later calls
        reuse it as built). attention/routing: as AutoModel.from_pretrained (None = the model's own mode)."""
        from modelcore.auto import DEFAULT_MODE
        from modelcore.defaults import default_generator_path

        p = Path(path) if path is not None else default_generator_path()
        attention = None if attention in DEFAULT_MODE else attention
        routing = None if routing in DEFAULT_MODE else routing
        key = (str(p.resolve()), quantization, dtype, attention, routing)
        with cls._registry_lock:
            eng = cls._registry.get(key)
            if eng is None or eng._closed or eng._pid != os.getpid():  # a forked child needs its own worker thread
                from modelcore.auto import AutoModel

                model = AutoModel.from_pretrained(str(p), quantization=quantization, dtype=dtype, attention=attention,
                                                  routing=routing)
                eng = cls(model, model.tokenizer, max_batch=max_batch, max_len=max_len, name=p.name)
                cls._registry[key] = eng
            return eng

    def close(self) -> None:
        """Stop the worker thread; requests still running end with finish_reason "cancelled"."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=30)

    # ---- requests --------------------------------------------------------------------------------
    def submit(self, prompt: str | None = None, *, messages: list[dict] | None = None, max_new_tokens: int = 256,
               temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
               seed: int | None = None, stop: list[str] | None = None) -> Request:
        """Queue a request and return it at once; iterate it for text pieces. Invalid requests raise here."""
        if self._closed:
            raise RuntimeError("this Engine is closed")
        ids = prompt_ids(self.tokenizer, prompt, messages)
        if len(ids) >= self.max_context:
            raise PromptError(f"prompt of {len(ids)} tokens leaves no room in the Engine's context of {self.max_context}")
        params = build_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                              repetition_penalty=repetition_penalty, seed=seed, stop=stop, eos=self.eos_token_ids)
        return self.enqueue(Request(ids, params, budget=min(params.max_new_tokens, self.max_context - len(ids))))

    def enqueue(self, req: Request) -> Request:
        """Queue an already-built request (``submit`` validates and builds one)."""
        with self._cond:
            self._waiting.append(req)
            self._cond.notify()
        return req

    def generate(self, prompt: str | list[dict] | None = None, **kwargs: Any) -> str:
        """Blocking convenience: the whole text (prompt may be a str or a messages list)."""
        if isinstance(prompt, list):
            kwargs["messages"], prompt = prompt, None
        req = self.submit(prompt, **kwargs)
        for _ in req:
            pass
        return req.text

    def stats(self) -> dict[str, int]:
        """Active and waiting request counts (for health pages)."""
        with self._cond:
            return {"active": len(self._rows), "waiting": len(self._waiting), "max_batch": self.max_batch}

    # ---- worker ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._closed and not self._rows and not self._waiting:
                        self._cond.wait()
                    if self._closed:
                        break
                    admit: list[Request] = []
                    while self._waiting and len(self._rows) + len(admit) < self.max_batch:
                        admit.append(self._waiting.popleft())
                try:
                    self._drop_cancelled()
                    self._admit(admit)
                    if self._rows:
                        self._decode_step()
                except Exception as exc:  # never let the worker die: fail what was in flight, keep serving
                    for st in self._rows:
                        st.req.fail(exc)
                    self._rows.clear()
        for st in list(self._rows):
            st.req.finish("cancelled")
        for req in self._waiting:
            req.finish("cancelled")

    def _view(self, start: int, stop: int) -> list:
        v = self._views.get((start, stop))
        if v is None:
            v = self._views[(start, stop)] = rows_view(self._cache, start, stop)
        return v

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill admitted requests into the next free rows and emit their first tokens."""
        live = []
        for req in reqs:
            if req.cancelled:
                req.finish("cancelled")
            else:
                live.append(req)
        if not live:
            return
        if self.prefill == "single":
            for req in live:
                self._prefill_one(req)
            return
        if self.prefix_reuse and len(live) > 1:
            # requests that share a prefix with each other but not with the store: prefill one of them first (it
            # refills the store), then the others reuse its K/V
            first = live[0]
            shared = min(common_prefix(first.prompt_ids, r.prompt_ids) for r in live[1:])
            if shared >= PREFIX_MIN_TOKENS and self._reuse(first.prompt_ids) < shared:
                self._prefill_one(first)
                live = live[1:]
        # grouped by the length left to compute after the reused prefix; on the fused CPU step all of them go in one
        # call (no padding, so no grouping)
        left = [len(r.prompt_ids) - self._reuse(r.prompt_ids) for r in live]
        if self._fused_prefill and sum(left) <= FUSED_PREFILL_MAX_TOKENS:
            groups = [live]
        else:
            groups = [[live[i] for i in g] for g in prefill_groups(left, self.prefill_overhead)]
        for group in groups:
            if len(group) == 1:
                self._prefill_one(group[0])
                continue
            try:
                self._prefill(group)
            except Exception:  # find the request at fault: prefill each alone, so only that one fails
                for req in group:
                    self._prefill_one(req)

    def _reuse(self, ids: list[int]) -> int:
        """How many leading tokens of `ids` the prefix store can supply (0 below PREFIX_MIN_TOKENS; at least one
        token is always left to compute: its logits give the first new token)."""
        if not self.prefix_reuse or not self._prefix_ids:
            return 0
        c = min(common_prefix(ids, self._prefix_ids), len(ids) - 1)
        return c if c >= PREFIX_MIN_TOKENS else 0

    def _prefill_one(self, req: Request) -> None:
        try:
            self._prefill([req])
        except Exception as exc:  # this request only: others keep going
            req.fail(exc)

    def _prefill(self, reqs: list[Request]) -> None:
        """One forward over `reqs` (right-padded) into rows len(rows).., then their first tokens.

        Right padding keeps every real token at positions 0..len-1, so the padded batch is an ordinary causal prefill
        from position 0: a real token attends only to slots <= its position, all real. The pads write K/V at slots
        len.. of their row, which each decode step overwrites before reading (a row's step writes its slot first).
        On failure nothing is admitted (rows not appended; their cache slots are rewritten by the next prefill)."""
        row, k = len(self._rows), len(reqs)
        dev = self.model.device
        self.prefill_forwards += 1
        lens = [len(r.prompt_ids) for r in reqs]
        longest = max(lens)
        if self.prefill == "single":  # the former path: explicit positions, masked attention over the cache
            ids = torch.tensor([reqs[0].prompt_ids], dtype=torch.long, device=dev)
            positions = torch.arange(ids.shape[1], device=dev)[None]  # (1, T)
            hidden = self.model.forward_hidden(ids, positions=positions, cache=rows_view(self._cache, row, row + 1))
            logits = self.model.lm_head(hidden[:, -1])  # (1, V)
        else:
            c = min(self._reuse(r.prompt_ids) for r in reqs)  # tokens taken from the prefix store, same in every row
            pad = reqs[0].prompt_ids[-1]  # any valid id: pads are never attended to
            view = self._view(row, row + k)
            if c:
                for layer, (pk, pv) in zip(view, self._prefix_kv):
                    layer.k[:, :, :c] = pk[None, :, :c]
                    layer.v[:, :, :c] = pv[None, :, :c]
                self.prefix_tokens_reused += c * k
            logits = None
            if self._fused_prefill:  # one C call over the full cache, each prompt into its own row, no padding
                logits = fused_prefill(self.model, self._view(0, self.max_batch), [r.prompt_ids for r in reqs],
                                       [c] * k, list(range(row, row + k)))
            if logits is None:
                ids = torch.tensor([r.prompt_ids[c:] + [pad] * (longest - len(r.prompt_ids)) for r in reqs],
                                   dtype=torch.long, device=dev)  # (k, T - c)
                if c:
                    positions = torch.arange(c, longest, device=dev).expand(k, longest - c)
                    hidden = self.model.forward_hidden(ids, positions=positions, cache=view)  # keys: slots <= position
                else:
                    hidden = self.model.forward_hidden(ids, cache=view)  # positions 0..T-1 in every row
                last = hidden[torch.arange(k, device=dev), torch.tensor(lens, device=dev) - 1 - c]  # (k, D)
                logits = self.model.lm_head(last)  # (k, V)
            if self.prefix_reuse:  # the store now holds this group's first prompt
                self._prefix_ids = list(reqs[0].prompt_ids)
                n = len(self._prefix_ids)
                self._prefix_kv = [(layer.k[0, :, :n].clone(), layer.v[0, :, :n].clone()) for layer in view]
        states = [RowState(r, self.tokenizer, self.model.args.vocab_size, device=dev) for r in reqs]
        self._rows.extend(states)
        self._advance(states, logits)

    def _decode_step(self) -> None:
        n = len(self._rows)
        tokens = torch.tensor([st.last for st in self._rows], dtype=torch.long, device=self.model.device)
        positions = torch.tensor([st.pos for st in self._rows], dtype=torch.long, device=self.model.device)
        try:
            if self._use_graphs:  # one captured step per active-row count, over rows 0..n-1 of the cache
                dec = self._graphs.get(n)
                if dec is None:
                    dec = self._graphs[n] = GraphDecoder(self.model, n, self.max_context, cache=self._view(0, n),
                                                         compiled=use_compile(self.model))
                try:
                    logits = dec(tokens, positions)  # (n, V)
                except RuntimeError:
                    if dec.graph is not None:
                        raise
                    import logging  # capture failed: serve on without graphs (the warm-up wrote nothing wrong: same K/V)

                    logging.getLogger(__name__).warning("CUDA graph capture failed; the Engine decodes eagerly", exc_info=True)
                    self._use_graphs, self._graphs = False, {}
                    logits = self.model(tokens[:, None], positions=positions[:, None],
                                        cache=self._view(0, n)).logits[:, -1]
            else:
                logits = decode_one_token(self.model, tokens, positions, self._view(0, n))
        except Exception as exc:  # a failing batched step fails its requests, not the Engine
            for st in self._rows:
                st.req.fail(exc)
            self._rows.clear()
            return
        self._advance(list(self._rows), logits)

    def _advance(self, states: list[RowState], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits (k, V), stream its text, and free rows that finished."""
        vocab = self.model.args.vocab_size
        logits = logits[:, :vocab]
        plain = [not st.req.params.do_sample and st.req.params.repetition_penalty == 1.0 for st in states]
        if all(plain):  # greedy rows: one argmax, one host read
            picks = _argmax_rows(logits)
        else:
            picks = [0] * len(states)
            greedy = [i for i, g in enumerate(plain) if g]
            if greedy:
                for i, t in zip(greedy, _argmax_rows(logits[greedy])):
                    picks[i] = t
            for i, st in enumerate(states):
                if not plain[i]:
                    p = st.req.params
                    lg = logits[i:i + 1]  # (1, V)
                    if st.seen is not None:
                        lg = apply_repetition_penalty(lg, st.seen[None, :vocab], p.repetition_penalty)
                    picks[i] = int(sample(lg, params=p, generator=st.generator)[0])
        done = [st for st, t in zip(states, picks) if st.push(t)]
        for st in done:
            self._free(st)
            st.req.finish(st.result or "stop")

    def _free(self, st: RowState) -> None:
        row, last = self._rows.index(st), len(self._rows) - 1
        if row != last:  # the moved request's K/V so far: its prompt and the tokens fed since (slots < pos)
            copy_cache_row(self._cache, last, row, min(self._rows[last].pos + 1, self.max_context))
            self._rows[row] = self._rows[last]
        self._rows.pop()

    def _drop_cancelled(self) -> None:
        for st in [s for s in self._rows if s.req.cancelled]:
            self._free(st)
            st.req.finish("cancelled")

