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
    TiedInt4Embedding,
    cat_linears,
    cpu_int4_block_rows,
    gptq_int4,
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
    # the scales are bfloat16 values (what the packed kernel reads), at most 1/128 above max|w|/127
    assert torch.equal(s.bfloat16().float(), s)
    ideal = linear.weight.abs().amax(dim=1) / 127
    assert bool((s >= ideal).all()) and bool((s <= ideal * (1 + 2 ** -7)).all())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_weights_error_bound(linear: nn.Linear, group: int) -> None:
    qw = quantize_int4(linear.weight, group_size=group)
    assert qw.codes.shape == (384, 512) and int(qw.codes.max()) <= 15 and qw.scales.shape == (384, 512 // group)
    err = (qw.dequantize() - linear.weight).abs().view(384, -1, group)
    assert bool((err <= qw.scales[..., None] / 2 + 1e-6).all())


def test_int8_linear_vs_float(linear: nn.Linear) -> None:
    """Stated tolerances (relative Frobenius error on a 3x7x512 -> 384 layer with rows of different scales):
    fallback == x @ dequantized weight (float32, 1e-5 rel); int8 vs float < 1%; packed vs fallback < 0.4% (bf16
    rounding of the input and output only, the scales are exact), on bf16-rounded inputs within 2^-7 rel."""
    x = torch.randn(3, 7, 512)
    ref = linear(x)
    fallback = Int8Linear.from_linear(linear, kernel="fallback")
    packed = Int8Linear.from_linear(linear, kernel="packed")
    q, s = quantize_int8(linear.weight)
    torch.testing.assert_close(fallback(x), x @ (q.float() * s[:, None]).T + linear.bias, rtol=1e-5, atol=1e-4)
    assert _rel(fallback(x), ref) < 0.01  # int8 per channel: < 1% relative error
    # packed kernel: bf16 input and output roundings only (2^-9 relative each), the scales are exact
    assert _rel(packed(x), fallback(x)) < 0.004
    assert packed(x).dtype == torch.float32 and packed(x).shape == (3, 7, 384)
    xb = x.bfloat16()
    torch.testing.assert_close(packed(xb).float(), fallback(xb).float(), rtol=0.02, atol=0.05)
    # same input in bf16 for both: packed == fallback up to the output rounding
    torch.testing.assert_close(packed(xb.float()), fallback(xb.float()), rtol=2 ** -7, atol=1e-3)


@pytest.mark.parametrize("k", [8, 24, 40, 100])
def test_int8_small_in_features_never_use_the_packed_kernel(k: int) -> None:
    """CPU _weight_int8pack_mm segfaults or returns garbage for in_features not a multiple of 16 (torch 2.13)."""
    torch.manual_seed(k)
    lin = nn.Linear(k, 1, bias=False)
    auto = Int8Linear.from_linear(lin)
    assert auto.kernel == "fallback"
    x = torch.randn(1, k)
    q, s = quantize_int8(lin.weight)
    torch.testing.assert_close(auto(x), x @ (q.float() * s[:, None]).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divisible by 16"):
        Int8Linear.from_linear(lin, kernel="packed")
    assert Int8Linear.from_linear(nn.Linear(48, 1)).kernel == "packed"


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_linear_vs_float(linear: nn.Linear, group: int) -> None:
    """Stated tolerances: fallback == x @ dequantized weight (1e-5 rel); int4 vs float < 8% / 9% / 10% relative
    for groups 32 / 64 / 128 (min/max round to nearest: about 1/(15*sqrt(12)) of a group's range per weight);
    packed vs fallback < 1% (bf16 activations and bf16 scales_and_zeros), also for a single decode row."""
    x = torch.randn(2, 9, 512)
    ref = linear(x)
    fallback = Int4Linear.from_linear(linear, group_size=group, kernel="fallback")
    packed = Int4Linear.from_linear(linear, group_size=group, kernel="packed")
    qw = quantize_int4(linear.weight, group_size=group)
    torch.testing.assert_close(fallback(x), x @ qw.dequantize().T + linear.bias, rtol=1e-5, atol=1e-4)
    assert _rel(fallback(x), ref) < {32: 0.08, 64: 0.09, 128: 0.10}[group]  # 4-bit: a few percent
    assert _rel(packed(x), fallback(x)) < 0.01
    torch.testing.assert_close(packed(x[:1, :1]), fallback(x[:1, :1]), rtol=0.02, atol=0.05)  # decode shape M=1


def test_int4_refined_quantizer() -> None:
    """refine=True: lower (weighted) error than min/max, bf16-exact scales and zeros, packed == fallback."""
    torch.manual_seed(3)
    w = torch.randn(256, 128) * torch.rand(256, 1)
    cols = torch.rand(128) * 4
    plain, ref = quantize_int4(w, group_size=32), quantize_int4(w, group_size=32, refine=True, col_weights=cols)
    werr = lambda q: float((((q.dequantize() - w) ** 2) * cols).sum())  # noqa: E731
    assert werr(ref) < 0.9 * werr(plain)
    zeros = ref.mins + 8 * ref.scales
    assert torch.equal(ref.scales.bfloat16().float(), ref.scales) and torch.equal(zeros.bfloat16().float(), zeros)
    x = torch.randn(5, 128)
    packed, fallback = Int4Linear(ref, None, kernel="packed"), Int4Linear(ref, None, kernel="fallback")
    torch.testing.assert_close(packed(x.bfloat16().float()), fallback(x.bfloat16().float()), rtol=2 ** -7, atol=2e-3)


@pytest.mark.skipif(cpu_int4_block_rows() is None, reason="unknown CPU int4 layout")
def test_packed_int4_rows_read_back_exactly() -> None:
    torch.manual_seed(4)
    qw = quantize_int4(torch.randn(192, 96), group_size=32, refine=True)
    packed = Int4Linear(qw, None, kernel="packed")
    ids = torch.tensor([0, 1, 31, 32, 63, 64, 100, 191, 5, 5])
    codes, scales, mins = packed.int4_rows(ids)
    assert torch.equal(codes, qw.codes[ids]) and torch.equal(scales, qw.scales[ids]) and torch.equal(mins, qw.mins[ids])
    torch.testing.assert_close(packed.dequantize(), qw.dequantize(), rtol=0, atol=0)
    emb = TiedInt4Embedding(packed, torch.float32)
    torch.testing.assert_close(emb(ids.view(2, 5)), qw.dequantize()[ids].view(2, 5, 96), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "int8-packed", "int8-fallback", "int4-packed", "int4-fallback"])
def test_cat_linears_equals_the_separate_layers(kind: str) -> None:
    torch.manual_seed(5)
    floats = [nn.Linear(128, n, bias=True) for n in (192, 64, 64)]
    if kind == "linear":
        mods = floats
    elif kind.startswith("int8"):
        mods = [Int8Linear.from_linear(f, kernel=kind.split("-")[1]) for f in floats]
    else:
        mods = [Int4Linear.from_linear(f, group_size=32, kernel=kind.split("-")[1]) for f in floats]
    fused = cat_linears(mods)
    x = torch.randn(3, 4, 128)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], dim=-1), rtol=0, atol=0)
    assert fused.out_features == 320 and fused.in_features == 128
    with pytest.raises(ValueError):
        cat_linears([mods[0], floats[1] if kind != "linear" else Int8Linear.from_linear(floats[1])])


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


@pytest.mark.skipif(cpu_int4_block_rows() is None, reason="unknown CPU int4 layout")
def test_int4_tied_embeddings_are_stored_once() -> None:
    model = _tiny()
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        int8_model = quantize_model(_tiny(), "int4", group_size=32)
        int8_emb = quantized_nbytes(int8_model)
        quantize_model(model, "int4", group_size=32, embeddings="int4")
        out = model(ids).logits
    emb, head = model.model.embed_tokens, model.lm_head
    assert isinstance(emb, TiedInt4Embedding) and isinstance(head, Int4Linear) and emb.head is head
    assert "model.embed_tokens.head.packed" not in model.state_dict()  # the head is not a second submodule
    # 256 x 128 tied matrix: int8 rows + float32 scales (lookup; the native head kernel reads these too, torch's packed
    # one keeps a bf16 copy) -> int4 + bf16 scale/zero per 32
    head8_copy = 256 * 2 if int8_model.lm_head.kernel == "packed" else 0
    assert quantized_nbytes(model) == int8_emb - (256 * 128 + 256 * 4 + head8_copy) + (256 * 64 + 256 * 4 * 4)
    torch.testing.assert_close(emb(ids[:, :3]), head.dequantize()[ids[:, :3]], rtol=0, atol=0)
    cos = torch.nn.functional.cosine_similarity(out, ref, dim=-1)
    assert float(cos.min()) >= 0.97, float(cos.min())
    assert model.quantization["embeddings"] == "int4"


def test_gptq_int4_lowers_the_output_error_on_correlated_inputs() -> None:
    """GPTQ's goal is the layer output on inputs like the calibration ones: < 0.7x the min/max rounding's error there."""
    torch.manual_seed(6)
    k = 128
    mix = torch.randn(k, k) / k ** 0.5 + torch.randn(k, 8) @ torch.randn(8, k)  # channels strongly correlated
    x = torch.randn(4096, k) @ mix
    w = torch.randn(96, k)
    qg = gptq_int4(w, x.T @ x / x.shape[0], group_size=32)
    qr = quantize_int4(w, group_size=32)
    x_test = torch.randn(2048, k) @ mix
    out_err = lambda q: float((x_test @ (q.dequantize() - w).T).norm())  # noqa: E731
    assert out_err(qg) < 0.7 * out_err(qr), (out_err(qg), out_err(qr))
    assert qg.codes.dtype == torch.uint8 and int(qg.codes.max()) <= 15
    zeros = qg.mins + 8 * qg.scales
    assert torch.equal(qg.scales.bfloat16().float(), qg.scales) and torch.equal(zeros.bfloat16().float(), zeros)


@pytest.mark.skipif(cpu_int4_block_rows() is None, reason="unknown CPU int4 layout")
def test_calibrated_int4_tied_head() -> None:
    ids = torch.randint(0, 256, (2, 24))
    ref_model = _tiny()
    with torch.no_grad():
        ref = ref_model(ids).logits
    model = quantize_model(_tiny(), "int4", group_size=32, embeddings="int4", head_calibration=torch.randint(0, 256, (700,)))
    assert isinstance(model.model.embed_tokens, TiedInt4Embedding) and model.model.embed_tokens.head is model.lm_head
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(model(ids).logits, ref, dim=-1)
    assert float(cos.min()) >= 0.97, float(cos.min())


def test_prequantized_codes_are_used_as_is() -> None:
    model = _tiny()
    name = "model.layers.0.mlp.up_proj.weight"
    qw = quantize_int4(torch.randn(256, 128), group_size=32)
    quantize_model(model, "int4", group_size=32, kernel="fallback", prequantized={name: qw})
    torch.testing.assert_close(model.model.layers[0].mlp.up_proj.dequantized_weight(torch.float32), qw.dequantize(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="unknown linears"):
        quantize_model(_tiny(), "int4", prequantized={"nope.weight": qw})
