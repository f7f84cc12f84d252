"""Continuous-batching Engine on the real SmolLM2 weights: concurrency, cancellation, bad requests, stops, sampling."""
from __future__ import annotations

import threading

import pytest
import torch

from modelcore.engine import Engine, Request, build_params
from modelcore.errors import GenerationConfigError, PromptError

QUESTIONS = [
    "What is revenue?",
    "Explain EBITDA in one sentence.",
    "List three risks for a bank.",
    "什么是资产负债表？",
    "What does a CFO do?",
]
N_NEW = 16


@pytest.fixture(scope="module")
def eng():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CI box is shared: one intra-op thread avoids OpenMP spin-waits
    shared = Engine.get()  # the process-wide weights; other test modules may have built it with other sizes
    eng = Engine(shared.model, shared.tokenizer, max_batch=4, max_len=512, name="test")
    yield eng
    eng.close()
    torch.set_num_threads(threads)


def _chat(q: str) -> list[dict]:
    return [{"role": "user", "content": q}]


def _alone(eng: Engine, q: str, n: int = N_NEW) -> str:
    """Reference: the model's own greedy generate() on this prompt alone, decoded without special tokens."""
    ids = eng.tokenizer.apply_chat_template(_chat(q), add_generation_prompt=True, tokenize=True, return_tensors="pt")
    out = eng.model.generate(ids, max_new_tokens=n)[0, ids.shape[1]:].tolist()
    eos = set(eng.eos_token_ids)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return eng.tokenizer.decode(out[:cut], skip_special_tokens=True).rstrip("\ufffd")  # Engine drops a cut-off character


def _concurrently(fn, n: int) -> list:
    out: list = [None] * n
    threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, fn(i))) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return out


def test_concurrent_requests_equal_alone(eng: Engine) -> None:
    assert Engine.get() is Engine.get() and Engine.get().model is eng.model  # one model per process, loaded once
    expected = [_alone(eng, q) for q in QUESTIONS]
    reqs = _concurrently(lambda i: eng.submit(messages=_chat(QUESTIONS[i]), max_new_tokens=N_NEW), len(QUESTIONS))
    pieces = _concurrently(lambda i: list(reqs[i]), len(QUESTIONS))  # 5 requests > 4 slots: one waits for a free row
    for q, want, req, got in zip(QUESTIONS, expected, reqs, pieces):
        assert req.text == want, q
        assert "".join(got) == req.text and "\ufffd" not in req.text
        assert req.finish_reason in ("stop", "length") and req.error is None
    assert any(r.finish_reason == "length" and r.n_tokens == N_NEW for r in reqs)
    assert eng.stats()["active"] == 0


def test_cancel_frees_the_slot(eng: Engine) -> None:
    long = [eng.submit(f"Write a long essay about topic number {i}.", max_new_tokens=400) for i in range(4)]
    it = iter(long[0])
    first = next(it)  # admitted and streaming
    long[0].cancel()
    rest = list(it)
    assert long[0].finish_reason == "cancelled" and long[0].n_tokens < 400
    assert long[0].text == first + "".join(rest)
    late = eng.submit(messages=_chat(QUESTIONS[0]), max_new_tokens=N_NEW)  # needs the freed row: all others still run
    assert late.wait(timeout=120) and late.text == _alone(eng, QUESTIONS[0])
    assert not any(r.done for r in long[1:])
    for r in long[1:]:
        r.cancel()
    assert all(r.wait(timeout=60) and r.finish_reason == "cancelled" for r in long[1:])
    assert eng.stats() == {"active": 0, "waiting": 0, "max_batch": 4}


def test_invalid_requests_fail_without_disturbing_others(eng: Engine) -> None:
    running = eng.submit(messages=_chat(QUESTIONS[1]), max_new_tokens=N_NEW)
    bad = [
        (dict(prompt=""), PromptError, "empty prompt"),
        (dict(prompt=None), PromptError, "exactly one"),
        (dict(prompt="x", messages=_chat("y")), PromptError, "exactly one"),
        (dict(messages=[{"role": "user"}]), PromptError, "messages must be"),
        (dict(prompt="hello " * 600), PromptError, "context of 512"),
        (dict(prompt="hi", temperature=-1.0), GenerationConfigError, "temperature"),
        (dict(prompt="hi", top_p=0.0), GenerationConfigError, "top_p"),
        (dict(prompt="hi", max_new_tokens=0), GenerationConfigError, "max_new_tokens"),
        (dict(prompt="hi", temperature="hot"), GenerationConfigError, "temperature must be a number"),
        (dict(prompt="hi", stop=[""]), GenerationConfigError, "stop_strings"),
    ]
    for kwargs, exc, msg in bad:
        prompt = kwargs.pop("prompt", None)
        with pytest.raises(exc, match=msg):
            eng.submit(prompt, **kwargs)
    assert running.wait(timeout=120) and running.error is None
    assert running.text == _alone(eng, QUESTIONS[1])


def test_stop_strings_and_length(eng: Engine) -> None:
    full = eng.generate(_chat(QUESTIONS[0]), max_new_tokens=N_NEW)
    words = full.split()
    assert len(words) > 4
    stop = " " + words[3]
    req = eng.submit(messages=_chat(QUESTIONS[0]), max_new_tokens=N_NEW, stop=["never-appears", stop])
    text = "".join(req)
    assert req.finish_reason == "stop" and stop not in text
    assert text == full[: full.index(stop)]
    short = eng.submit(messages=_chat(QUESTIONS[0]), max_new_tokens=3)
    assert "".join(short) and short.finish_reason == "length" and short.n_tokens == 3


def test_seeded_sampling_is_reproducible_under_concurrency(eng: Engine) -> None:
    kw = dict(messages=_chat("Name a colour."), max_new_tokens=12, temperature=1.0, top_p=0.95, top_k=50)
    alone = eng.generate(seed=7, **kw)
    texts = _concurrently(lambda i: eng.generate(seed=7 if i % 2 == 0 else 1000 + i, **kw), 4)
    assert texts[0] == texts[2] == alone
    assert len({alone, texts[1], texts[3]}) > 1  # other seeds give other samples


def test_failure_inside_the_worker_fails_only_that_request(eng: Engine) -> None:
    running = eng.submit(messages=_chat(QUESTIONS[4]), max_new_tokens=N_NEW)
    params = build_params(max_new_tokens=4, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=None,
                          stop=None, eos=eng.eos_token_ids)
    broken = eng.enqueue(Request([eng.model.args.vocab_size + 5], params, budget=4))  # id outside the embedding table
    with pytest.raises(IndexError):
        list(broken)
    assert broken.finish_reason == "error" and isinstance(broken.error, IndexError)
    assert running.wait(timeout=120) and running.error is None and running.text == _alone(eng, QUESTIONS[4])
    assert eng.generate("Say hello.", max_new_tokens=4)  # the worker still serves


def test_repetition_penalty_matches_generate(eng: Engine) -> None:
    ids = eng.tokenizer.apply_chat_template(_chat(QUESTIONS[2]), add_generation_prompt=True, tokenize=True, return_tensors="pt")
    out = eng.model.generate(ids, max_new_tokens=N_NEW, repetition_penalty=1.3)[0, ids.shape[1]:].tolist()
    cut = next((i for i, t in enumerate(out) if t in set(eng.eos_token_ids)), len(out))
    want = eng.tokenizer.decode(out[:cut], skip_special_tokens=True).rstrip("\ufffd")
    got = _concurrently(lambda i: eng.generate(_chat(QUESTIONS[2 + i]), max_new_tokens=N_NEW, repetition_penalty=1.3), 2)
    assert got[0] == want and got[0] != _alone(eng, QUESTIONS[2])


PREFILL_PROMPTS = [
    "Hi.",
    "What is revenue?",
    "Explain EBITDA in one sentence, please.",
    "什么是资产负债表？请简单说明。",
    "List three risks for a bank and say which one matters most for a small regional lender today.",
    "What does a CFO do?",
    "Describe, in plain words and for a reader who has never seen a balance sheet, what equity means.",
    "Why do banks fail?",
]


@pytest.mark.parametrize("overhead,reuse", [(10**6, False), (10**6, True), (None, True)])
def test_batched_prefill_equals_alone(eng: Engine, overhead: int | None, reuse: bool) -> None:
    """Eight chat prompts of different lengths admitted in one step give each prompt's own greedy text: prefilled in
    one right-padded forward; or, with the prefix store, the first alone and the rest from its shared system prompt."""
    big = Engine(eng.model, eng.tokenizer, max_batch=8, max_len=512, name="test-prefill")
    try:
        if overhead is not None:
            big.prefill_overhead = overhead
        big.prefix_reuse = reuse
        lengths = [len(big.tokenizer.apply_chat_template(_chat(q), add_generation_prompt=True, tokenize=True))
                   for q in PREFILL_PROMPTS]
        assert len(set(lengths)) == len(lengths)  # all different: the batch is padded
        expected = [_alone(big, q) for q in PREFILL_PROMPTS]
        with big._cond:  # hold the worker back until all eight are queued: admitted in one step
            reqs = [big.submit(messages=_chat(q), max_new_tokens=N_NEW) for q in PREFILL_PROMPTS]
        for q, want, req in zip(PREFILL_PROMPTS, expected, reqs):
            assert req.wait(timeout=300) and req.error is None
            assert req.text == want, q
        if not reuse:
            assert big.prefill_forwards == 1 and big.prefix_tokens_reused == 0  # all eight in one padded forward
        elif overhead is not None:
            assert big.prefill_forwards == 2  # the first prompt alone, then the seven others on its prefix
            assert big.prefix_tokens_reused >= 7 * 20  # the chat template's system prompt, 7 times
        else:
            assert 2 <= big.prefill_forwards < len(PREFILL_PROMPTS) and big.prefix_tokens_reused >= 7 * 20
        assert big.stats()["active"] == 0
        # later requests reuse the stored prefix too, a prompt equal to the stored one included (its last token is
        # computed again for the logits)
        before = big.prefix_tokens_reused
        again = [big.generate(_chat(q), max_new_tokens=N_NEW) for q in (PREFILL_PROMPTS[0], PREFILL_PROMPTS[0], "Hello")]
        assert again[:2] == [expected[0]] * 2 and again[2] == _alone(big, "Hello")
        assert (big.prefix_tokens_reused - before >= 3 * 20) if reuse else big.prefix_tokens_reused == 0
    finally:
        big.close()


def test_single_prefill_mode_equals_alone(eng: Engine) -> None:
    """prefill="single" (the former one-prompt-per-forward admission, kept for A/B benchmarks) still serves right."""
    old = Engine(eng.model, eng.tokenizer, max_batch=2, max_len=512, name="test-single", prefill="single")
    try:
        texts = _concurrently(lambda i: old.generate(_chat(QUESTIONS[i]), max_new_tokens=N_NEW), 2)
        assert texts == [_alone(eng, q) for q in QUESTIONS[:2]]
        assert old.prefill_forwards == 2 and old.prefix_tokens_reused == 0
    finally:
        old.close()
    with pytest.raises(ValueError, match="prefill"):
        Engine(eng.model, eng.tokenizer, prefill="paged")


def test_prefill_groups() -> None:
    from modelcore.engine import prefill_groups

    assert prefill_groups([40, 39, 46, 39], overhead=10**6) == [[1, 3, 0, 2]]  # sorted by length, one batch
    assert prefill_groups([5, 300], overhead=8) == [[0], [1]]  # padding 5 -> 300 costs more than a forward
    groups = prefill_groups([39, 43, 39, 40, 46, 40, 42, 39])
    assert sorted(i for g in groups for i in g) == list(range(8))


def test_bf16_engine_over_float32_cache(eng: Engine) -> None:
    """The portal's CPU configuration: bf16 activations over a float32 KV cache (see Attention.new_cache), through
    one-at-a-time requests that reuse the stored prefix and through a batched prefill."""
    shared = Engine.get(dtype="bfloat16")
    e = Engine(shared.model, shared.tokenizer, max_batch=4, max_len=512, name="test-bf16")
    try:
        assert e.model.dtype == torch.bfloat16 and e.model.new_cache(1, 8)[0].k.dtype == torch.float32
        expected = [_alone(e, q) for q in QUESTIONS[:3]]
        assert [e.generate(_chat(q), max_new_tokens=N_NEW) for q in QUESTIONS[:3]] == expected
        assert e.prefix_tokens_reused >= 2 * 20  # the second and third reused the chat template's system prompt
        with e._cond:  # admitted in one step: one batched prefill
            reqs = [e.submit(messages=_chat(q), max_new_tokens=N_NEW) for q in QUESTIONS[:3]]
        for req in reqs:
            assert req.wait(timeout=300) and req.error is None and req.text.strip()
    finally:
        e.close()
