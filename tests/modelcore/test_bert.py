"""Our BERT encoder vs transformers' BertModel, fused vs unfused QKV, SDPA vs naive attention, bad checkpoints."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modelcore.bert import BertArgs, BertModel
from modelcore.defaults import default_encoder_path

TEXTS = [
    "Net revenue rose 12% year over year to $4.2 billion, driven by cloud subscriptions.",
    "Operating margin",
    "公司二零二三年第二季度营业收入同比增长百分之八。",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core box, two OpenMP threads spin-wait and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def minilm() -> Path:
    return default_encoder_path()


def _batch(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(folder))(TEXTS, padding=True, return_tensors="pt"))


def _assert_close_on_tokens(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, atol: float) -> None:
    keep = mask.bool()
    torch.testing.assert_close(ours[keep], ref[keep], atol=atol, rtol=1e-4)


def test_minilm_hidden_states_match_transformers(minilm: Path) -> None:
    from transformers import BertModel as HFBert

    batch = _batch(minilm)
    assert not bool(batch["attention_mask"].all()), "the batch must contain padding"
    ours = BertModel.from_pretrained(minilm)
    ref = HFBert.from_pretrained(str(minilm), attn_implementation="eager").eval()
    with torch.inference_mode():
        h_ref = ref(**batch).last_hidden_state
        h_ours = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        h_naive = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], naive=True)
        ours.fuse_qkv()
        h_fused = ours(batch["input_ids"], batch["attention_mask"])
    _assert_close_on_tokens(h_ours, h_ref, batch["attention_mask"], atol=1e-4)
    _assert_close_on_tokens(h_naive, h_ours, batch["attention_mask"], atol=1e-5)
    _assert_close_on_tokens(h_fused, h_ours, batch["attention_mask"], atol=1e-5)


def test_prefixed_checkpoint_and_tanh_gelu_match_transformers(tmp_path: Path) -> None:
    """A BertForMaskedLM-style checkpoint ('bert.' key prefix, extra head weights) with gelu_new loads too."""
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                     max_position_embeddings=64, hidden_act="gelu_new")
    hf = BertForMaskedLM(cfg).eval()
    hf.save_pretrained(tmp_path)
    ids = torch.randint(5, 300, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    ours = BertModel.from_pretrained(tmp_path)
    assert ours.args.hidden_act == "gelu_new" and ours.args.head_dim == 16
    with torch.inference_mode():
        ref = hf.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    _assert_close_on_tokens(got, ref, mask, atol=1e-5)


def test_bad_checkpoints_fail_clearly(tmp_path: Path, minilm: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        BertModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="expected 'bert'"):
        BertModel.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="position_embedding_type"):
        BertArgs.from_hf_config({**json.loads((minilm / "config.json").read_text()), "position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="not divisible"):
        BertArgs(dim=100, n_heads=12)
    model = BertModel(BertArgs(vocab_size=50, dim=32, n_layers=1, n_heads=2, inter_dim=64, max_position_embeddings=16))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 16"):
        model(torch.ones(1, 17, dtype=torch.long))


def test_automodel_dispatches_bert_folders(minilm: Path) -> None:
    from modelcore import AutoModel

    model = AutoModel.from_pretrained(minilm, dtype="bfloat16")
    assert isinstance(model, BertModel) and model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
    enc = model.tokenizer(TEXTS[0], return_tensors="pt")
    ref = BertModel.from_pretrained(minilm)
    with torch.inference_mode():
        cos = torch.nn.functional.cosine_similarity(model(enc["input_ids"]).float().mean(1), ref(enc["input_ids"]).mean(1))
    assert float(cos) > 0.999
    with pytest.raises(ValueError, match="quantization applies to decoders"):
        AutoModel.from_pretrained(minilm, quantization="int8")
