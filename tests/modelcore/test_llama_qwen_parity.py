"""Our Llama/Qwen2 against transformers' eager reference: prefill, KV-cached decode, greedy continuations, round trip."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from modelcore import AutoModel
from modelcore.generate import decode_one_token, prefill
from modelcore.model import positions_from_mask

VARIANTS = ["llama", "llama3_tied", "qwen2", "qwen2_tied_yarn", "mistral_window"]  # built in conftest.py
VOCAB = 1024  # conftest.PARITY_VOCAB

ATOL = 1e-4


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """2 x 20 ids; row 1 is left-padded by 5 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :5] = 0
    ids[1, :5] = 2
    return ids, mask


def hf_positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused_qkv_gate_up"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_prefill_and_cached_decode_match_transformers(variant, fused, tiny_checkpoints, make_hf_model):
    hf = make_hf_model(variant)
    ours = AutoModel.from_pretrained(tiny_checkpoints[variant], device_map="cpu")
    if fused:
        assert ours.fuse_projections() == 2 * ours.args.n_layers
    ids, mask = padded_batch()
    with torch.no_grad():  # an unpadded batch takes the causal-kernel prefill (no mask tensor)
        assert_close(ours(ids[:1]).logits, hf(input_ids=ids[:1]).logits, atol=ATOL, rtol=0)
    with torch.no_grad():
        ref = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=2)
        ref_prefill = hf(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        our_prefill = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(our_prefill[real], ref_prefill[real], atol=ATOL, rtol=0)
    with torch.no_grad():  # final-norm hidden states, what decoder embeddings pool
        ref_hidden = hf.model(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).last_hidden_state
        assert_close(ours.hidden_states(ids, attention_mask=mask)[real], ref_hidden[real], atol=ATOL, rtol=0)

    # 16 KV-cached decode steps, teacher-forced on the reference's greedy tokens
    new_tokens = ref.sequences[:, ids.shape[1]:]
    assert new_tokens.shape == (2, 16)
    with torch.inference_mode():
        cache = ours.new_cache(2, 64)
        logits, pos = prefill(ours, ids, mask, cache)
        steps = [logits]
        for i in range(15):
            steps.append(decode_one_token(ours, new_tokens[:, i], pos, cache))
            pos = pos + 1
    for i, (mine, theirs) in enumerate(zip(steps, ref.logits)):
        assert_close(mine, theirs, atol=ATOL, rtol=0, msg=lambda m: f"step {i}: {m}")

    # greedy continuation identical
    out = ours.generate(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    assert torch.equal(out[:, ids.shape[1]:], new_tokens)


@pytest.mark.parametrize("variant", ["llama", "qwen2_tied_yarn"])
def test_sdpa_matches_naive_attention_and_cache_matches_full_forward(variant, tiny_checkpoints, make_hf_model):
    ours = AutoModel.from_pretrained(tiny_checkpoints[variant], device_map="cpu")
    ids, mask = padded_batch(seed=2)
    with torch.inference_mode():
        fast = ours(ids, attention_mask=mask).logits
        ours.set_naive_attention(True)
        naive = ours(ids, attention_mask=mask).logits
        ours.set_naive_attention(False)
        assert_close(fast[mask.bool()], naive[mask.bool()], atol=1e-5, rtol=1e-5)
        # prompt in two chunks through the cache == one full forward
        cache = ours.new_cache(2, 32)
        pos = positions_from_mask(mask)
        first = ours(ids[:, :12], positions=pos[:, :12], cache=cache).logits
        second = ours(ids[:, 12:], positions=pos[:, 12:], cache=cache).logits
    chunked = torch.cat([first, second], dim=1)
    assert_close(chunked[mask.bool()], fast[mask.bool()], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama3_tied", "qwen2"])
def test_save_pretrained_round_trip_loads_in_transformers(variant, tiny_checkpoints, tmp_path, make_hf_model):
    from transformers import AutoModelForCausalLM

    ours = AutoModel.from_pretrained(tiny_checkpoints[variant], device_map="cpu")
    ours.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    again = AutoModel.from_pretrained(tmp_path, device_map="cpu")
    ids, mask = padded_batch(seed=3)
    with torch.no_grad():
        mine = ours(ids, attention_mask=mask).logits
        theirs = back(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits
        reloaded = again(ids, attention_mask=mask).logits
    assert_close(theirs[mask.bool()], mine[mask.bool()], atol=ATOL, rtol=0)
    assert torch.equal(reloaded, mine)
    assert back.config.tie_word_embeddings == ours.args.tie_word_embeddings


def test_save_pretrained_keeps_tokenizer_and_chat_template(tiny_llama, tmp_path):
    from transformers import AutoTokenizer as HFTokenizer

    ours = AutoModel.from_pretrained(tiny_llama, device_map="cpu")
    ours.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path, device_map="cpu")
    text = "Revenue rose 12% to ¥3.4 billion in 2023. 营业收入同比增长"
    assert again.tokenizer.encode(text) == ours.tokenizer.encode(text)
    msgs = [{"role": "user", "content": text}]
    hf_tok = HFTokenizer.from_pretrained(tmp_path)
    assert again.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_bfloat16_checkpoint_keeps_its_dtype_unless_asked(tmp_path, make_hf_model):
    hf = make_hf_model("qwen2").to(torch.bfloat16)
    hf.save_pretrained(tmp_path)
    ours = AutoModel.from_pretrained(tmp_path, device_map="cpu")
    assert ours.dtype == torch.bfloat16
    assert ours.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # memory-mapped: not fused on CPU
    as_f32 = AutoModel.from_pretrained(tmp_path, device_map="cpu", dtype="float32")
    assert as_f32.dtype == torch.float32
    ids = torch.randint(3, VOCAB, (1, 12))
    with torch.no_grad():
        ref = hf.float()(ids).logits
        assert_close(as_f32(ids).logits, ref, atol=ATOL, rtol=0)
        assert_close(ours(ids).logits.float(), ref, atol=0.1, rtol=0.05)


@pytest.mark.parametrize("scaling, seq_len", [
    ({"rope_type": "linear", "factor": 4.0}, None),
    ({"rope_type": "dynamic", "factor": 2.0}, 200),
    ({"rope_type": "dynamic", "factor": 2.0}, 900),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 64}, None),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}, None),
    ({"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
      "mscale": 1.0, "mscale_all_dim": 0.707}, None),
    ({"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "attention_factor": 1.3,
      "truncate": False}, None),
])
def test_rope_scaling_matches_transformers(scaling, seq_len):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from modelcore.rope import RotaryEmbedding

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=512,
                      rope_parameters={"rope_theta": 50000.0, **scaling})
    ref_inv, ref_factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](cfg, torch.device("cpu"), seq_len)
    rope = RotaryEmbedding(64, 50000.0, 512, scaling)
    positions = torch.arange(seq_len or 16)[None]
    assert_close(rope._inv_freq_for(positions), ref_inv.float(), atol=1e-7, rtol=1e-5)
    assert rope.attention_factor == pytest.approx(ref_factor)
    cos, sin = rope(positions, torch.float32)
    assert cos.shape == (1, positions.shape[1], 64)
    assert_close(cos[0, -1, :32], torch.cos(positions[0, -1] * ref_inv.float()) * ref_factor, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_saves_float_weights_that_transformers_loads(mode, tiny_checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    path = tiny_checkpoints["qwen2"]
    quantized = AutoModel.from_pretrained(path, device_map="cpu", quantization=mode)
    float_model = AutoModel.from_pretrained(path, device_map="cpu")
    assert quantized.quantization["mode"] == mode
    quantized.save_pretrained(tmp_path)
    assert (tmp_path / "modelcore_quantization.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    again = AutoModel.from_pretrained(tmp_path, device_map="cpu")  # re-quantized from the stored setting
    assert again.quantization == quantized.quantization
    ids, mask = padded_batch(seed=4)
    real = mask.bool()
    with torch.no_grad():
        q = quantized(ids, attention_mask=mask).logits[real]
        f = float_model(ids, attention_mask=mask).logits[real]
        hf = back(input_ids=ids, attention_mask=mask, position_ids=hf_positions(mask)).logits[real]
        re = again(ids, attention_mask=mask).logits[real]
    gap = (q - f).abs().max()
    assert gap > 1e-3  # quantization really changed the weights
    assert (hf - q).abs().max() < 0.02 and (re - q).abs().max() < 0.02  # the saved floats are the quantized weights


def test_sharded_checkpoint_loads_like_a_single_file(tiny_checkpoints, tmp_path, make_hf_model):
    make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded = AutoModel.from_pretrained(tmp_path, device_map="cpu")
    single = AutoModel.from_pretrained(tiny_checkpoints["llama"], device_map="cpu")
    ids, mask = padded_batch(seed=5)
    with torch.no_grad():
        assert torch.equal(sharded(ids, attention_mask=mask).logits, single(ids, attention_mask=mask).logits)
    next(tmp_path.glob("model-*.safetensors")).unlink()
    from modelcore.errors import CheckpointError

    with pytest.raises(CheckpointError, match="missing"):
        AutoModel.from_pretrained(tmp_path, device_map="cpu")
