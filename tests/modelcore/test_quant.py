"""int8 / int4 weight-only quantization: quantized linears vs float, packed kernels vs the dequantize-matmul twin."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from modelcore.args import ModelArgs
from modelcore.model import Transformer
from modelcore.quant import (
    Int4Embedding,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantized_nbytes,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture()
def linear() -> nn.Linear:
    torch.manual_seed(0)
    lin = nn.Linear(512, 384, bias=True)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(384, 1) * 3 + 0.1)  # rows of different scales
    return lin


def test_int8_weights_error_bound(linear: nn.Linear) -> None:
    q, s = quantize_int8(linear.weight)
    assert q.dtype == torch.int8 and s.shape == (384,)
    err = (q.float() * s[:, None] - linear.weight).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())  # round-to-nearest: half a step per output channel


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_error_bound(linear: nn.Linear, group: int) -> None:
    qw = quantize_int4(linear.weight, group_size=group)
    assert qw.codes.shape == (384, 512) and int(qw.codes.max()) <= 15 and qw.scales.shape == (384, 512 // group)
    err = (qw.dequantize() - linear.weight).abs().view(384, -1, group)
    assert bool((err <= qw.scales[..., None] / 2 + 1e-6).all())


def test_int8_linear_vs_float(linear: nn.Linear) -> None:
    x = torch.randn(3, 7, 512)
    ref = linear(x)
    fallback = Int8Linear.from_linear(linear, kernel="fallback")
    packed = Int8Linear.from_linear(linear, kernel="packed")
    q, s = quantize_int8(linear.weight)
    torch.testing.assert_close(fallback(x), x @ (q.float() * s[:, None]).T + linear.bias, rtol=1e-5, atol=1e-4)
    assert _rel(fallback(x), ref) < 0.01  # int8 per channel: < 1% relative error
    assert _rel(packed(x), fallback(x)) < 0.01  # packed kernel runs in bf16
    assert packed(x).dtype == torch.float32 and packed(x).shape == (3, 7, 384)
    xb = x.bfloat16()
    torch.testing.assert_close(packed(xb).float(), fallback(xb).float(), rtol=0.02, atol=0.05)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_vs_float(linear: nn.Linear, group: int) -> None:
    x = torch.randn(2, 9, 512)
    ref = linear(x)
    fallback = Int4Linear.from_linear(linear, group_size=group, kernel="fallback")
    packed = Int4Linear.from_linear(linear, group_size=group, kernel="packed")
    qw = quantize_int4(linear.weight, group_size=group)
    torch.testing.assert_close(fallback(x), x @ qw.dequantize().T + linear.bias, rtol=1e-5, atol=1e-4)
    assert _rel(fallback(x), ref) < {32: 0.08, 64: 0.09, 128: 0.10}[group]  # 4-bit: a few percent
    assert _rel(packed(x), fallback(x)) < 0.01
    torch.testing.assert_close(packed(x[:1, :1]), fallback(x[:1, :1]), rtol=0.02, atol=0.05)  # decode shape M=1


def test_quantized_embeddings() -> None:
    torch.manual_seed(1)
    w = torch.randn(100, 64)
    ids = torch.tensor([[0, 5, 99], [7, 7, 1]])
    e8, e4 = Int8Embedding(w, torch.float32), Int4Embedding(w, torch.float32, group_size=32)
    assert e8(ids).shape == (2, 3, 64)
    assert _rel(e8(ids), w[ids]) < 0.01
    torch.testing.assert_close(e4(ids), quantize_int4(w, group_size=32).dequantize()[ids], rtol=1e-6, atol=1e-6)


def test_bad_settings(linear: nn.Linear) -> None:
    with pytest.raises(ValueError, match="group_size"):
        quantize_int4(linear.weight, group_size=48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int4(torch.randn(4, 96), group_size=64)
    with pytest.raises(ValueError, match="quantization must be"):
        quantize_model(nn.Sequential(linear), "int3")
    with pytest.raises(ValueError, match="kernel"):
        Int8Linear.from_linear(linear, kernel="fast")


def _tiny() -> Transformer:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=256,
                     max_position_embeddings=128, tie_word_embeddings=True)
    return Transformer(args).eval()


@pytest.mark.parametrize("mode,floor", [("int8", 0.999), ("int4", 0.98)])
def test_quantize_model_logits_close(mode: str, floor: float) -> None:
    model = _tiny()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        float_bytes = quantized_nbytes(model)
        quantize_model(model, mode, group_size=32)
        out = model(ids).logits
    kinds = {type(m).__name__ for m in model.modules()}
    assert ("Int8Linear" if mode == "int8" else "Int4Linear") in kinds and not any(type(m) is nn.Linear for m in model.modules())
    assert model.dtype == torch.float32  # the KV cache still gets a float dtype
    # embeddings are int8 in both modes, and the tied head reads the very same int8 tensor
    assert isinstance(model.model.embed_tokens, Int8Embedding) and isinstance(model.lm_head, Int8Linear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert float(cos.min()) >= floor, float(cos.min())
    assert quantized_nbytes(model) < float_bytes * (0.3 if mode == "int8" else 0.2)


def test_prequantized_codes_are_used_as_is() -> None:
    model = _tiny()
    name = "model.layers.0.mlp.up_proj.weight"
    qw = quantize_int4(torch.randn(256, 128), group_size=32)
    quantize_model(model, "int4", group_size=32, kernel="fallback", prequantized={name: qw})
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.dequantized_weight(torch.float32), qw.dequantize(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown linears"):
        quantize_model(_tiny(), "int4", prequantized={"nope.weight": qw})
