"""Bad input ends in a clear ModelCoreError, never a hang or a silent wrong answer, and leaves the model usable."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from modelcore import AutoModel
from modelcore.errors import (CheckpointError, GenerationConfigError, ModelCoreError, ModelNotFoundError, PromptError,
                              UnknownArchitectureError)


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return AutoModel.from_pretrained(tiny_checkpoints["llama"], device_map="cpu")


@pytest.fixture()
def copy_of(tiny_checkpoints, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(tiny_checkpoints["llama"], dst)
    return dst


def test_missing_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        AutoModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        AutoModel.from_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelNotFoundError, match="not a .gguf"):
        AutoModel.from_pretrained(tmp_path / "weights.bin")


def test_truncated_and_corrupt_safetensors(copy_of):
    st = copy_of / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModel.from_pretrained(copy_of)
    st.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        AutoModel.from_pretrained(copy_of)
    st.write_bytes((40).to_bytes(8, "little") + b"{" * 40 + data[48:])
    with pytest.raises(CheckpointError, match="corrupt"):
        AutoModel.from_pretrained(copy_of)
    st.unlink()
    with pytest.raises(ModelNotFoundError, match="no model.safetensors"):
        AutoModel.from_pretrained(copy_of)


def test_unknown_architecture_and_mismatched_weights(copy_of):
    cfg_path = copy_of / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(UnknownArchitectureError, match="gpt_neox"):
        AutoModel.from_pretrained(copy_of)
    cfg_path.write_text(json.dumps({**cfg, "model_type": "qwen2", "use_sliding_window": True}))
    with pytest.raises(UnknownArchitectureError, match="use_sliding_window"):
        AutoModel.from_pretrained(copy_of)
    cfg_path.write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.2"):
        AutoModel.from_pretrained(copy_of)
    cfg_path.write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(CheckpointError, match="shape"):
        AutoModel.from_pretrained(copy_of)
    cfg_path.write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "wobbly", "factor": 2.0}}))
    with pytest.raises(UnknownArchitectureError, match="wobbly"):
        AutoModel.from_pretrained(copy_of)
    cfg_path.write_text("{broken")
    with pytest.raises(CheckpointError, match="invalid JSON"):
        AutoModel.from_pretrained(copy_of)
    with pytest.raises(ValueError, match="quantization"):
        AutoModel.from_pretrained(copy_of, quantization="int3")


def test_prompt_errors(model):
    max_pos = model.args.max_position_embeddings
    with pytest.raises(PromptError, match="longer than the model's context"):
        model.generate(input_ids=torch.ones(1, max_pos + 1, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(PromptError, match="fills the whole context"):
        model.generate(input_ids=torch.ones(1, max_pos, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(PromptError, match="empty prompt"):
        model.generate(input_ids=torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(PromptError, match="empty prompt in batch rows \\[1\\]"):
        model.generate(input_ids=torch.ones(2, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]]))
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.generate(input_ids=torch.tensor([[5, model.args.vocab_size]]))
    with pytest.raises(PromptError, match="needs a tokenizer"):
        model.generate(input_ids="no tokenizer in this folder")
    with pytest.raises(GenerationConfigError, match="leaves no room"):
        model.generate(input_ids=torch.ones(1, 8, dtype=torch.long), max_length=8)


@pytest.mark.parametrize("options, message", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k must be an integer >= 0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ({"stop_strings": [""]}, "stop_strings must be non-empty"),
    ({"beams": 4}, "unknown generate\\(\\) options"),
])
def test_invalid_generation_options(model, options, message):
    ids = torch.tensor([[5, 6, 7]])
    before = model.generate(input_ids=ids, max_new_tokens=4, eos_token_id=[])
    with pytest.raises(GenerationConfigError, match=message):
        model.generate(input_ids=ids, **options)
    assert isinstance(GenerationConfigError("x"), ModelCoreError)
    assert torch.equal(model.generate(input_ids=ids, max_new_tokens=4, eos_token_id=[]), before)  # nothing else lost
