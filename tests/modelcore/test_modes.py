"""Portal profile modes: `attention=` / `routing=` on AutoModel.from_pretrained (and Engine.get) pick real code paths.

MLA "naive" attention and MoE "loop" routing are the reference twins of the defaults ("absorbed", "dispatch"):
the same tiny DeepSeek-V2 checkpoint loaded with each must give the same logits, with the modules really switched.
Models without MLA / MoE take only the defaults and reject the rest with a ValueError naming the problem.
"""
from __future__ import annotations

import pytest
import torch

from modelcore.auto import AutoModel
from modelcore.mla import MLA
from modelcore.moe import MoE

COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4,
              v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
              max_position_embeddings=64, q_lora_rank=None, bos_token_id=0, eos_token_id=1)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ds_modes")
    DeepseekV2ForCausalLM(DeepseekV2Config(**COMMON)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_modes")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(path)
    return path


def _load(path, **modes):
    return AutoModel.from_pretrained(path, device_map="cpu", dtype="float32", load_tokenizer=False, **modes)


def test_modes_switch_paths_and_agree(deepseek_dir) -> None:
    default = _load(deepseek_dir)
    naive = _load(deepseek_dir, attention="naive", routing="loop")
    explicit = _load(deepseek_dir, attention="absorbed", routing="dispatch")
    mlas = lambda m: [x for x in m.modules() if isinstance(x, MLA)]  # noqa: E731
    moes = lambda m: [x for x in m.modules() if isinstance(x, MoE)]  # noqa: E731
    assert {x.impl for x in mlas(default)} == {"auto"} and {x.impl for x in mlas(naive)} == {"naive"}
    assert {x.routing for x in moes(default)} == {"dispatch"} and {x.routing for x in moes(naive)} == {"loop"}
    assert {x.impl for x in mlas(explicit)} == {"auto"} and {x.routing for x in moes(explicit)} == {"dispatch"}
    ids = torch.randint(2, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = [m.generate(input_ids=ids, max_new_tokens=6, eos_token_id=[]) for m in (default, naive, explicit)]
        la, lb = default(ids).logits, naive(ids).logits
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


@pytest.mark.parametrize("modes", [dict(attention="sparse"), dict(routing="dynamic")])
def test_unknown_mode_is_rejected(deepseek_dir, modes) -> None:
    with pytest.raises(ValueError, match="must be one of"):
        _load(deepseek_dir, **modes)


def test_gqa_model_takes_only_defaults(llama_dir) -> None:
    for blank in (None, "", "auto", "default"):
        _load(llama_dir, attention=blank, routing=blank)
    with pytest.raises(ValueError, match="applies to MLA models"):
        _load(llama_dir, attention="absorbed")
    with pytest.raises(ValueError, match="applies to mixture-of-experts models"):
        _load(llama_dir, routing="dispatch")


def test_engine_get_passes_modes(llama_dir) -> None:
    from modelcore.engine import Engine

    with pytest.raises(ValueError, match="applies to MLA models"):
        Engine.get(llama_dir, attention="naive")
