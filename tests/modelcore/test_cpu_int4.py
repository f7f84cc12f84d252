"""Our own CPU int4 kernel (modelcore/csrc/int4_cpu.c) against its naive twins, for every instruction-set path."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from modelcore import cpu_int4
from modelcore.quant import Int4Linear, Int8Linear, TiedInt4Embedding, cat_linears, quantize_int4, quantize_model


def _cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


FLAGS = _cpu_flags()
ISA_NEEDS = {"native": set(), "x86-64-v3": {"avx2", "fma"}, "x86-64": set()}


def _kernel(isa: str) -> cpu_int4.Kernel:
    if not ISA_NEEDS[isa] <= FLAGS:
        pytest.skip(f"this CPU lacks {ISA_NEEDS[isa] - FLAGS}")
    return cpu_int4.load(isa)


def _twin(x: torch.Tensor, qw, zeros: torch.Tensor) -> torch.Tensor:
    """The kernel's arithmetic in float64: (code - 8) * scale times int8 activations (per 32 columns, round half to even),
    plus zero times the exact sums."""
    m, k = x.shape
    xc = x.double().view(m, k // 32, 32)
    d = xc.abs().amax(-1) / 127.0  # (M, C)
    d = d.float().double()  # the kernel keeps d in float32
    inv = torch.where(d > 0, 1.0 / d.float().double(), torch.zeros_like(d))
    xq = torch.round((x.float() * inv.float().repeat_interleave(32, 1)).double()).clamp(-127, 127)  # (M, K)
    xdq = xq * d.repeat_interleave(32, 1)  # int8 activations times their scales
    g = qw.group_size
    s = qw.scales.double().repeat_interleave(g, 1)  # (N, K)
    z = zeros.double().repeat_interleave(g, 1)
    return xdq @ ((qw.codes.double() - 8) * s).T + x.double() @ z.T


@pytest.mark.parametrize("isa", cpu_int4.ISAS)
@pytest.mark.parametrize("group", [32, 64, 128])
def test_kernel_matches_its_float64_twin(isa: str, group: int) -> None:
    kern = _kernel(isa)
    torch.manual_seed(1)
    n, k = 96, 256
    qw = quantize_int4(torch.randn(n, k) * torch.rand(n, 1), group_size=group, refine=True)
    zeros = qw.mins + 8 * qw.scales
    blocks, block_scales = cpu_int4.pack(qw.codes, qw.scales, zeros)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9):  # every row count of a pass and of its register tiles (8 = 4 + 4, 9 = 8 + 1)
        x = torch.randn(m, k) * 3
        x[0, :32] = 0.0  # an all-zero chunk: scale 0
        y = kern.matmul(x, blocks, block_scales, group)
        ref = _twin(x, qw, zeros)
        torch.testing.assert_close(y.double(), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-5)
        # and against the float layer: int8 activations cost < 1% relative error
        exact = x.double() @ qw.dequantize().double().T
        assert float((y.double() - exact).norm() / exact.norm()) < 0.01


def test_pack_reads_back_exactly() -> None:
    torch.manual_seed(2)
    qw = quantize_int4(torch.randn(64, 128), group_size=64, refine=True)
    zeros = qw.mins + 8 * qw.scales
    blocks, block_scales = cpu_int4.pack(qw.codes, qw.scales, zeros)
    assert blocks.shape == (64, 64) and block_scales.shape == (64, 4) and block_scales.dtype == torch.bfloat16
    ids = torch.tensor([0, 17, 63, 5, 17])
    codes, scales, z = cpu_int4.unpack_rows(blocks, block_scales, ids)
    assert torch.equal(codes, qw.codes[ids]) and torch.equal(scales, qw.scales[ids]) and torch.equal(z, zeros[ids])


@pytest.mark.parametrize("group", [32, 128])
def test_native_linear_vs_fallback_twin(group: int) -> None:
    """Int4Linear(kernel="native") against the dequantize-then-F.linear twin on the same codes: < 1% relative."""
    if cpu_int4.library() is None:
        pytest.skip("the native kernel does not build here")
    torch.manual_seed(3)
    lin = nn.Linear(512, 384, bias=True)
    qw = quantize_int4(lin.weight, group_size=group, refine=True)
    native, fallback = Int4Linear(qw, lin.bias, kernel="native"), Int4Linear(qw, lin.bias, kernel="fallback")
    assert Int4Linear(qw, lin.bias).kernel == "native"  # the default on this CPU
    for shape in ((1, 1, 512), (3, 7, 512)):
        x = torch.randn(shape)
        a, b = native(x), fallback(x)
        assert a.shape == b.shape == (*shape[:-1], 384)
        assert float((a - b).norm() / b.norm()) < 0.01
        xb = x.bfloat16()
        assert native(xb).dtype == torch.bfloat16
    assert torch.equal(native.dequantize(), fallback.dequantize())


def test_native_refuses_shapes_it_cannot_take() -> None:
    qw = quantize_int4(torch.randn(40, 64), group_size=32)  # 40 rows: not a multiple of 16
    assert Int4Linear(qw, None).kernel != "native"
    with pytest.raises(ValueError, match="native int4/int8 kernel"):
        Int4Linear(qw, None, kernel="native")
    if cpu_int4.library() is not None:
        qw = quantize_int4(torch.randn(32, 64), group_size=32)
        lin = Int4Linear(qw, None, kernel="native")
        with pytest.raises(ValueError, match="refused"):
            cpu_int4.library().matmul(torch.randn(1, 96), torch.zeros(32, 48, dtype=torch.uint8), lin.block_scales, 64)


def test_native_cat_and_tied_rows() -> None:
    if cpu_int4.library() is None:
        pytest.skip("the native kernel does not build here")
    torch.manual_seed(4)
    floats = [nn.Linear(128, n, bias=False) for n in (64, 32, 32)]
    mods = [Int4Linear.from_linear(f, group_size=32, kernel="native") for f in floats]
    fused = cat_linears(mods)
    assert fused.kernel == "native"
    x = torch.randn(2, 128)
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in mods], dim=-1), atol=1e-5, rtol=1e-5)
    emb = TiedInt4Embedding(mods[0], torch.float32)
    ids = torch.tensor([[3, 0, 63]])
    torch.testing.assert_close(emb(ids)[0], mods[0].dequantize()[ids[0]], atol=0, rtol=0)


def test_quantize_model_uses_native_and_tracks_fallback() -> None:
    """A tiny model quantized to int4 runs every linear on the native kernel, and its logits stay close to the same
    codes run by the dequantize-then-matmul fallback (int8 activations: < 2% relative)."""
    if cpu_int4.library() is None:
        pytest.skip("the native kernel does not build here")
    import copy

    from modelcore.args import ModelArgs
    from modelcore.model import Transformer

    torch.manual_seed(5)
    args = ModelArgs(vocab_size=256, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, inter_dim=256, max_position_embeddings=64)
    base = Transformer(args).eval()
    native = quantize_model(copy.deepcopy(base), "int4", kernel="auto", quantize_embeddings=False)
    fallback = quantize_model(copy.deepcopy(base), "int4", kernel="fallback", quantize_embeddings=False)
    assert {m.kernel for m in native.modules() if isinstance(m, Int4Linear)} == {"native"}
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        a, b = native(ids), fallback(ids)
    a, b = getattr(a, "logits", a), getattr(b, "logits", b)
    assert float((a - b).norm() / b.norm()) < 0.02


@pytest.mark.parametrize("isa", cpu_int4.ISAS)
def test_int8_kernel_matches_its_float64_twin(isa: str) -> None:
    """The int8 (per-row scale) kernel: int8 activations per 32 columns times the int8 codes, in float64, for K with
    and without a last half vector of 32 (96 = 64 + 32), an all-zero chunk, an odd number of weight rows (the AVX2
    path pairs them) and 1 to 8 rows of x (its tiles take 4)."""
    kern = _kernel(isa)
    torch.manual_seed(6)
    from modelcore.quant import quantize_int8

    for k, m in ((96, 5), (128, 5), (96, 1), (128, 2), (96, 3), (128, 8), (96, 7)):
        q, s = quantize_int8(torch.randn(41, k) * torch.rand(41, 1))
        x = torch.randn(m, k) * 2
        x[-1, 32:64] = 0.0
        y = kern.int8_matmul(x, q, s)
        xc = x.double().view(m, k // 32, 32)
        d = (xc.abs().amax(-1) / 127.0).float().double()
        inv = torch.where(d > 0, 1.0 / d.float().double(), torch.zeros_like(d))
        xq = torch.round((x.float() * inv.float().repeat_interleave(32, 1)).double()).clamp(-127, 127)
        ref = (xq * d.repeat_interleave(32, 1)) @ (q.double() * s.double()[:, None]).T
        torch.testing.assert_close(y.double(), ref, atol=1e-4 * float(ref.abs().max()), rtol=1e-5)
    with pytest.raises(ValueError, match="int8 kernel"):
        kern.int8_matmul(torch.randn(1, k + 32), q, s)


@pytest.mark.parametrize("isa", cpu_int4.ISAS)
def test_rows_get_the_same_bits_alone_or_batched(isa: str) -> None:
    """A row of x gives bit-identical outputs whether it is multiplied alone or with up to 9 others (int8: the tiles
    of 4 weight rows x 4 rows of x and the one-row path; int4: register tiles of rows): so a greedy stream's text
    does not depend on how many other streams the Engine batches with it."""
    kern = _kernel(isa)
    torch.manual_seed(9)
    from modelcore.quant import quantize_int8

    q, s = quantize_int8(torch.randn(43, 96))
    qw = quantize_int4(torch.randn(48, 128), group_size=32)
    blocks, block_scales = cpu_int4.pack(qw.codes, qw.scales, qw.mins + 8 * qw.scales)
    for m in (2, 3, 5, 8, 10):
        x8, x4 = torch.randn(m, 96), torch.randn(m, 128)
        y8, y4 = kern.int8_matmul(x8, q, s), kern.matmul(x4, blocks, block_scales, 32)
        for i in range(m):
            assert torch.equal(y8[i], kern.int8_matmul(x8[i:i + 1].contiguous(), q, s)[0]), (m, i)
            assert torch.equal(y4[i], kern.matmul(x4[i:i + 1].contiguous(), blocks, block_scales, 32)[0]), (m, i)


def test_int8_block_layout_kernel_matches_the_row_major_one() -> None:
    """The output head's block-layout int8 kernel (AVX512-VNNI builds): the same quantized products as the row-major
    kernel, so equal to float rounding (1e-5 of the scale), bit-identical for a row alone or batched (1 to 10 rows:
    tiles of 8 and their remainders), and clear errors for shapes outside the layout."""
    kern = cpu_int4.library()
    if kern is None or not kern.int8_blocked:
        pytest.skip("no AVX512-VNNI build here")
    torch.manual_seed(10)
    from modelcore.quant import quantize_int8

    for n, k in ((48, 96), (64, 576), (32, 128)):
        q, s = quantize_int8(torch.randn(n, k) * torch.rand(n, 1))
        s = s.float().contiguous()
        wb = cpu_int4.pack_int8_blocks(q)
        assert wb.shape == (n, k) and wb.dtype == torch.uint8
        for m in (1, 2, 7, 8, 10):
            x = torch.randn(m, k) * 2
            y, ref = kern.int8_blocked_matmul(x, wb, s), kern.int8_matmul(x, q, s)
            torch.testing.assert_close(y, ref, atol=1e-5 * float(ref.abs().max()), rtol=0)
            for i in range(m):
                assert torch.equal(y[i], kern.int8_blocked_matmul(x[i:i + 1].contiguous(), wb, s)[0]), (n, k, m, i)
    with pytest.raises(ValueError, match="N % 16"):
        cpu_int4.pack_int8_blocks(torch.zeros(40, 64, dtype=torch.int8))
    with pytest.raises(ValueError, match="int8 block kernel"):
        kern.int8_blocked_matmul(torch.randn(1, 64), wb, s)


def test_native_int8_linear_vs_fallback_and_tied_embedding() -> None:
    """Int8Linear(kernel="native") vs its dequantize-then-F.linear twin (< 1%); a tied int8 model shares one tensor."""
    if cpu_int4.library() is None:
        pytest.skip("the native kernel does not build here")
    from modelcore.quant import Int8Linear

    torch.manual_seed(7)
    lin = nn.Linear(256, 96, bias=True)
    native, fallback = Int8Linear.from_linear(lin, kernel="native"), Int8Linear.from_linear(lin, kernel="fallback")
    assert Int8Linear.from_linear(lin).kernel == "native"
    for rows in (5, 7):  # 15 rows: our kernel; 21 rows: torch's packed kernel on the same codes
        x = torch.randn(3, rows, 256)
        a, b = native(x), fallback(x)
        assert a.shape == (3, rows, 96) and float((a - b).norm() / b.norm()) < 0.01
        assert native(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("isa", cpu_int4.ISAS)
def test_dequantize_bf16_matches_the_codes(isa: str) -> None:
    """The prefill path's bf16 weight: (code - 8) * scale + zero from the packed layout, within one bf16 rounding of
    the float dequantization of the same codes."""
    kern = _kernel(isa)
    torch.manual_seed(8)
    qw = quantize_int4(torch.randn(48, 256) * torch.rand(48, 1), group_size=64, refine=True)
    blocks, block_scales = cpu_int4.pack(qw.codes, qw.scales, qw.mins + 8 * qw.scales)
    w = kern.dequantize_bf16(blocks, block_scales, 64)
    ref = qw.dequantize()
    assert w.dtype == torch.bfloat16 and w.shape == (48, 256)
    torch.testing.assert_close(w.float(), ref, atol=1e-6, rtol=2 ** -8)


@pytest.mark.parametrize("bf16_units", [True, False])
def test_native_int4_long_inputs_take_the_dense_path(bf16_units: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """From native_dense_path()'s row count on (prefill), the native layer multiplies by its dequantized weight, in
    bf16 from 512 rows on CPUs with bf16 units, in float32 from 2,048 rows elsewhere: still < 1% from the float
    twin, and equal to F.linear on that weight; one row fewer takes the int8 kernel."""
    if cpu_int4.library() is None:
        pytest.skip("the native kernel does not build here")
    import modelcore.defaults
    from modelcore import quant

    monkeypatch.setattr(modelcore.defaults, "cpu_has_native_bf16", lambda: bf16_units)
    quant.native_dense_path.cache_clear()
    try:
        rows, dtype = quant.native_dense_path()
        assert (rows, dtype) == ((quant.NATIVE_INT4_DEQUANT_ROWS, torch.bfloat16) if bf16_units else
                                 (quant.NATIVE_INT4_DEQUANT_ROWS_NO_BF16, torch.float32))
        torch.manual_seed(9)
        lin = nn.Linear(256, 64, bias=True)
        qw = quantize_int4(lin.weight, group_size=32)
        native, fallback = Int4Linear(qw, lin.bias, kernel="native"), Int4Linear(qw, lin.bias, kernel="fallback")
        x = torch.randn(1, rows, 256)
        a, b = native(x), fallback(x)
        assert float((a - b).norm() / b.norm()) < 0.01
        w = cpu_int4.library().dequantize_bf16(native.blocks, native.block_scales, 32).to(dtype)
        dense = (torch.nn.functional.linear(x.to(dtype), w) + lin.bias.detach().to(dtype)).float()
        torch.testing.assert_close(a, dense, atol=0.05 if bf16_units else 1e-4, rtol=0.02 if bf16_units else 1e-4)
        below = native(x[:, 1:])  # the int8 kernel: int8 activations, not equal to the dense product
        assert not torch.allclose(below, dense[:, 1:], atol=1e-6, rtol=0)
        assert float((below - b[:, 1:]).norm() / b[:, 1:].norm()) < 0.01
    finally:
        quant.native_dense_path.cache_clear()


def test_native_int8_long_inputs_follow_the_build() -> None:
    """A native int8 layer with 40 rows: on the AVX2 build it stays on our kernel (equal to calling it), elsewhere
    it goes to torch's packed kernel from 17 rows; either way within 1% of its float twin."""
    lib = cpu_int4.library()
    if lib is None:
        pytest.skip("the native kernel does not build here")
    from modelcore.quant import NATIVE_INT8_MAX_ROWS, native_int8_max_rows, quantize_int8

    assert native_int8_max_rows() == (1 << 62 if lib.isa == "avx2" else NATIVE_INT8_MAX_ROWS)
    torch.manual_seed(12)
    q, s = quantize_int8(torch.randn(64, 128))
    native, fallback = Int8Linear(q, s, None, kernel="native"), Int8Linear(q, s, None, kernel="fallback")
    x = torch.randn(40, 128)
    a, b = native(x), fallback(x)
    assert float((a - b).norm() / b.norm()) < 0.01
    if lib.isa == "avx2":
        assert torch.equal(a, lib.int8_matmul(x, native.weight, native.scales))


def test_kernel_builds_where_a_compiler_exists() -> None:
    """On x86-64 Linux with gcc (the project's machines, CI), the kernels build and are the default: the other tests
    here skip without them, so this one fails instead of letting a broken build pass quietly."""
    import platform
    import shutil

    import os

    if platform.machine() != "x86_64" or shutil.which("gcc") is None or os.environ.get("MODELCORE_CPU_INT4", "1") == "0":
        pytest.skip("no gcc on an x86-64 machine, or the kernels are switched off")
    assert cpu_int4.library() is not None, "modelcore/csrc failed to build (see the log)"
    assert cpu_int4.library().isa in ("avx512vnni", "avx2", "scalar")
