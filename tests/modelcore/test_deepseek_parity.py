"""DeepSeek-V2/V3 checkpoints written by transformers load into modelcore and match transformers' eager model.

Tiny random configs, saved with save_pretrained, loaded with our AutoModel.from_pretrained; fp32 logits within
1e-4 max-abs for a 2x20 batch (prefill and 16 KV-cached decode steps) and identical greedy continuations.
"""
from __future__ import annotations

import pytest
import torch

from modelcore.auto import AutoModel
from modelcore.mla import MLA, LatentCache
from modelcore.moe import MoE

B, T, STEPS, VOCAB = 2, 20, 16, 256
TOL = 1e-4
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
              v_head_dim=12, n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
              max_position_embeddings=256, initializer_range=0.1, bos_token_id=0, eos_token_id=1, pad_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "mscale": 1.0, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}

VARIANTS = {
    "v2_no_q_lora_group_limited": ("deepseek_v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=4,
                                                       topk_group=2, routed_scaling_factor=1.5)),
    "v2_q_lora_greedy": ("deepseek_v2", dict(q_lora_rank=24, topk_method="greedy", n_group=1, topk_group=1)),
    "v3_q_lora_noaux_tc_yarn": ("deepseek_v3", dict(q_lora_rank=24, n_group=4, topk_group=2, norm_topk_prob=True,
                                                    routed_scaling_factor=2.5, rope_parameters=YARN)),
    "v3_no_q_lora_half_split_rope": ("deepseek_v3", dict(q_lora_rank=None, n_group=2, topk_group=1, norm_topk_prob=True,
                                                         routed_scaling_factor=2.5, rope_interleave=False)),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is far faster than two on a shared, busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_hf(variant: str):
    """A tiny random transformers DeepSeek model (eager attention, fp32), V3 with a non-zero correction bias."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

    model_type, extra = VARIANTS[variant]
    cfg_cls, model_cls = ((DeepseekV2Config, DeepseekV2ForCausalLM) if model_type == "deepseek_v2"
                          else (DeepseekV3Config, DeepseekV3ForCausalLM))
    torch.manual_seed(0)
    config = cfg_cls(**COMMON, **extra)
    config._attn_implementation = "eager"
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.5 * torch.rand(buf.shape))  # random, non-zero: must steer the choice
    return model


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    hf = build_hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = AutoModel.from_pretrained(path, device_map="cpu", dtype="float32", load_tokenizer=False)
    return request.param, hf, ours


def test_loads_as_mla_and_moe(pair) -> None:
    variant, hf, ours = pair
    layers = ours.model.layers
    assert all(isinstance(layer.self_attn, MLA) for layer in layers)
    assert [isinstance(layer.mlp, MoE) for layer in layers] == [False, True, True]  # first_k_dense_replace=1
    gate = layers[1].mlp.gate
    assert gate.score_func == ("sigmoid" if variant.startswith("v3") else "softmax")
    if variant.startswith("v3"):
        assert gate.e_score_correction_bias.abs().min() > 0
        torch.testing.assert_close(gate.e_score_correction_bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)
    cache = ours.new_cache(B, T + STEPS)
    assert all(isinstance(c, LatentCache) for c in cache)
    assert tuple(cache[0].kv.shape) == (B, 1, T + STEPS, 16 + 8)  # kv_lora_rank + qk_rope_head_dim per token


def test_prefill_and_cached_decode_match_transformers(pair) -> None:
    from transformers import DynamicCache

    variant, hf, ours = pair
    ids = torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    hf_cache = DynamicCache(config=hf.config)
    cache = ours.new_cache(B, T + STEPS)
    with torch.no_grad():
        ref = hf(input_ids=ids, cache=hf_cache, use_cache=True).logits
        full = ours(ids).logits  # no cache
        got = ours(ids, cache=cache).logits  # prefill into the latent cache
    assert ref.abs().max() > 0.1  # logits are not trivially small
    assert (full - ref).abs().max() <= TOL, f"{variant}: prefill max-abs {(full - ref).abs().max():.2e}"
    assert (got - ref).abs().max() <= TOL
    nxt = ref[:, -1].argmax(-1)
    greedy = [nxt]
    for step in range(STEPS):
        pos = torch.full((B, 1), T + step)
        with torch.no_grad():
            ref = hf(input_ids=nxt[:, None], cache=hf_cache, use_cache=True).logits
            got = ours(nxt[:, None], positions=pos, cache=cache).logits
        diff = (got - ref).abs().max()
        assert diff <= TOL, f"{variant}: decode step {step} max-abs {diff:.2e}"
        assert torch.equal(got[:, -1].argmax(-1), ref[:, -1].argmax(-1))
        nxt = ref[:, -1].argmax(-1)
        greedy.append(nxt)
    hf_tokens = torch.stack(greedy[:STEPS], dim=1)  # (B, STEPS)
    out = ours.generate(input_ids=ids, max_new_tokens=STEPS, eos_token_id=[])
    assert torch.equal(out[:, T:], hf_tokens), f"{variant}: greedy continuations differ"


def test_fused_expert_checkpoint_loads(pair, tmp_path) -> None:
    """A checkpoint holding experts as 3-D tensors (transformers' in-memory layout) loads to the same model."""
    from safetensors.torch import save_file

    variant, hf, ours = pair
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in sd)  # really the fused layout
    save_file(sd, str(tmp_path / "model.safetensors"))
    hf.config.to_json_file(str(tmp_path / "config.json"))
    fused = AutoModel.from_pretrained(tmp_path, device_map="cpu", dtype="float32", load_tokenizer=False)
    ids = torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, ours(ids).logits, rtol=1e-5, atol=1e-5)


def test_save_pretrained_round_trips_to_transformers(pair, tmp_path) -> None:
    """Our save_pretrained of a DeepSeek model is a folder transformers loads to the very same model."""
    variant, hf, ours = pair
    ours.save_pretrained(tmp_path)
    again = type(hf).from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.randint(2, VOCAB, (B, T), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, hf(ids).logits, rtol=1e-6, atol=1e-6)
