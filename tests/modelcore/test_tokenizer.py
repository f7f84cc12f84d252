"""Our AutoTokenizer against transformers' on the same folder (SmolLM2's tokenizer), on real English and Chinese text."""
from __future__ import annotations

import json

import pytest
import torch

from modelcore import AutoTokenizer
from modelcore.errors import TokenizerError


@pytest.fixture(scope="module")
def pair(tokenizer_dir):
    from transformers import AutoTokenizer as HFTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir), HFTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def texts(shared_dir) -> list[str]:
    """TAT-QA paragraphs, questions and table cells (English, numbers) + CMRC 2018 questions and contexts (Chinese)."""
    tatqa = json.loads((shared_dir / "eval" / "tatqa" / "tatqa_dataset_dev.json").read_text(encoding="utf-8"))
    out: list[str] = []
    for doc in tatqa[:40]:
        out += [p["text"] for p in doc["paragraphs"]] + [q["question"] for q in doc["questions"]]
        out.append(" | ".join(" ".join(row) for row in doc["table"]["table"]))
    cmrc = json.loads((shared_dir / "eval" / "cmrc2018" / "queries.json").read_text(encoding="utf-8"))["queries"]
    for q in cmrc[:80]:
        out += [q["question"], q["context"]]
    assert len(out) > 300
    return out


def test_ids_match_transformers_on_english_and_chinese(pair, texts):
    ours, theirs = pair
    chinese = 0
    for text in texts:
        mine = ours.encode(text)
        assert mine == theirs(text)["input_ids"], text[:80]
        assert ours.decode(mine) == theirs.decode(mine)
        chinese += any("\u4e00" <= ch <= "\u9fff" for ch in text)
    assert chinese >= 100


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(pair, texts, side):
    ours, theirs = pair
    batch = [texts[0][:200], texts[-1][:50], "营收"]
    mine = ours(batch, return_tensors="pt", padding_side=side)
    ref = theirs(batch, return_tensors="pt", padding=True, padding_side=side)
    assert torch.equal(mine["input_ids"], ref["input_ids"])
    assert torch.equal(mine["attention_mask"], ref["attention_mask"])
    assert mine.input_ids.shape[0] == 3


def test_chat_template_matches_transformers(pair):
    ours, theirs = pair
    msgs = [{"role": "system", "content": "You are a careful equity analyst."},
            {"role": "user", "content": "2019年营业收入是多少？"},
            {"role": "assistant", "content": "约 1,496.5 百万美元。"},
            {"role": "user", "content": "And in 2018?"}]
    for gen in (True, False):
        text = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        assert text == theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
        ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        ref = theirs.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert ids == list(ref)
    as_tensor = ours.apply_chat_template(msgs, add_generation_prompt=False, return_tensors="pt")
    assert as_tensor.tolist() == [ids]


def test_special_tokens_and_errors(pair, tmp_path):
    ours, theirs = pair
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        AutoTokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError, match="cannot be read"):
        AutoTokenizer.from_pretrained(tmp_path)
    with pytest.raises(TokenizerError, match="list of"):
        ours.apply_chat_template("hello")
    with pytest.raises(TokenizerError, match="str"):
        ours(123)
