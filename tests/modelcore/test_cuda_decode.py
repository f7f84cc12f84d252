"""CUDA decode path (runs only where CUDA is present; the GPU benchmarks run it too).

* generate() on CUDA replays a captured (and torch.compile'd) decode step over a static cache: its greedy tokens
  must equal the eager step's, for a GQA model (float32) and a DeepSeek-V2 MLA + MoE model (bfloat16, packed experts).
* CUDA int4 (modelcore/triton_int4.py): the layout round-trips; the GEMV and the dequantize + GEMM path match the
  matmul with the reference-dequantized weight; the prefill's prefetched weights give the same outputs as the plain
  path; an int4 model's graphed greedy decode equals its eager decode.
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _tiny_qwen(dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from modelcore.args import ModelArgs
    from modelcore.model import Transformer

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
                      num_key_value_heads=2, max_position_embeddings=1024)
    hf = Qwen2ForCausalLM(cfg).to("cuda", dtype).eval()
    args = ModelArgs(model_type="qwen2", vocab_size=512, dim=256, n_layers=3, n_heads=8, n_kv_heads=2, inter_dim=512,
                     max_position_embeddings=1024, attention_bias=True, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=10000.0, dtype=str(dtype).removeprefix("torch."))
    with torch.device("meta"):
        ours = Transformer(args)
    ours.load_state_dict(hf.state_dict(), strict=False, assign=True)
    return ours.eval().requires_grad_(False), hf


def _graph_vs_eager(model, ids: torch.Tensor, new: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    model.cuda_graphs = True
    graphed = model.generate(input_ids=ids, max_new_tokens=new, eos_token_id=[])
    again = model.generate(input_ids=ids, max_new_tokens=new, eos_token_id=[])  # reuses the captured graph
    assert torch.equal(graphed, again)
    assert model.__dict__.get("_graph_decoders"), "generate() did not use a CUDA graph"
    model.cuda_graphs = False
    eager = model.generate(input_ids=ids, max_new_tokens=new, eos_token_id=[])
    model.cuda_graphs = True
    return graphed, eager


def test_graphed_generate_equals_eager_gqa() -> None:
    model, hf = _tiny_qwen(torch.float32)
    model.fuse_projections()
    ids = torch.randint(0, 512, (3, 17), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    graphed, eager = _graph_vs_eager(model, ids)
    assert torch.equal(graphed, eager)
    ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(graphed, ref)


def test_graphed_generate_equals_eager_mla_moe() -> None:
    from modelcore.loading import config_to_args
    from modelcore.model import Transformer

    cfg = dict(model_type="deepseek_v2", vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
               num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=2, n_routed_experts=16,
               num_experts_per_tok=4, kv_lora_rank=64, q_lora_rank=None, qk_rope_head_dim=16, v_head_dim=32,
               qk_nope_head_dim=32, first_k_dense_replace=1, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = Transformer(config_to_args(cfg)).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(old)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if name.endswith("norm.weight") else torch.randn_like(p) * 0.05)
    ids = torch.randint(0, 512, (2, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    model.compile_decode = False  # the same kernels in the graph as eagerly: only the capture is under test here
    graphed, eager = _graph_vs_eager(model, ids)
    assert (graphed == eager).float().mean() >= 0.9  # bf16 + atomics in the expert sums: near-ties may flip late tokens
    assert torch.equal(graphed[:, :12], eager[:, :12])


def _int4_weight(n: int, k: int, group: int, seed: int):
    """Random int4 weights whose scales and zeros are bf16-exact (as the kernels take them)."""
    from modelcore.quant import Int4Weights, quantize_int4

    torch.manual_seed(seed)
    qw = quantize_int4(torch.randn(n, k, device="cuda") * 0.02, group_size=group)
    scales = qw.scales.to(torch.bfloat16).float()
    zeros = (qw.mins + 8.0 * qw.scales).to(torch.bfloat16).float()
    return Int4Weights(qw.codes, scales, zeros - 8.0 * scales, group)


def _sz(qw) -> torch.Tensor:
    """scales_and_zeros (G, N, 2) bf16 as Int4Linear builds them."""
    zeros = qw.mins.float() + 8.0 * qw.scales.float()
    return torch.stack([qw.scales.float(), zeros], -1).transpose(0, 1).to(torch.bfloat16).contiguous()


def test_cuda_int4_layout_roundtrip() -> None:
    from modelcore import triton_int4

    qw = _int4_weight(96, 384, 32, 0)
    packed = triton_int4.pack(qw.codes)
    assert packed.shape == (96, 192) and packed.dtype == torch.uint8
    assert torch.equal(triton_int4.unpack(packed), qw.codes.to(torch.uint8))
    assert torch.equal(triton_int4.unpack(triton_int4.pack(qw.codes.cpu())), qw.codes.cpu().to(torch.uint8))
    # the reference dequantizer reproduces the quantizer's weights up to the bf16 rounding of scales and zeros
    torch.testing.assert_close(triton_int4.dequantize_reference(packed, _sz(qw), 32), qw.dequantize(torch.float32),
                               rtol=0.01, atol=3e-4)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 8])
def test_cuda_int4_gemv_matches_dequantized_matmul(group: int, m: int) -> None:
    from modelcore import triton_int4

    if not triton_int4.available():
        pytest.skip("needs Triton")
    n, k = 200, 1024  # 200 rows: the last program's rows are partly past the end
    qw = _int4_weight(n, k, group, m)
    packed, sz = triton_int4.pack(qw.codes), _sz(qw)
    w = triton_int4.dequantize_reference(packed, sz, group)  # float32 (N, K)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda")
    y = triton_int4.gemv(x, packed, sz, group)
    ref = x.float() @ w.T
    torch.testing.assert_close(y.float(), ref, rtol=4e-3, atol=1e-4)  # bf16 rounding of the output
    yb = triton_int4.gemv(x, packed, sz, group, bias)
    torch.testing.assert_close(yb.float(), ref + bias, rtol=4e-3, atol=1e-4)
    for cfg in ({"PREFETCH": 2, "BB": 4}, {"KS": 3, "BB": 8}, {"BN": 32, "BB": 4, "num_warps": 8, "KS": 2}, {"MB": 8, "BN": 4, "BB": 16, "num_warps": 2}):
        torch.testing.assert_close(triton_int4.gemv(x, packed, sz, group, bias, **cfg).float(), ref + bias, rtol=4e-3,
                                   atol=1e-4)
    xs = torch.randn(m, 2 * k, device="cuda", dtype=torch.bfloat16)[:, ::2]  # strided rows: the op makes them contiguous
    gemv_rows = m <= triton_int4.GEMV_MAX_ROWS  # else the op dequantizes: bf16 weight, bf16 GEMM output, bf16 bias add
    torch.testing.assert_close(torch.ops.modelcore.int4_linear(xs, packed, sz, bias, group).float(),
                               xs.float() @ w.T + bias, rtol=4e-3 if gemv_rows else 2e-2, atol=1e-4 if gemv_rows else 2e-2)


@pytest.mark.parametrize("group", [32, 128])
def test_cuda_int4_dequantize_matches_reference(group: int) -> None:
    from modelcore import triton_int4

    if not triton_int4.available():
        pytest.skip("needs Triton")
    qw = _int4_weight(136, 640, group, 7)
    packed, sz = triton_int4.pack(qw.codes), _sz(qw)
    ref = triton_int4.dequantize_reference(packed, sz, group)
    torch.testing.assert_close(triton_int4.dequantize(packed, sz, group).float(), ref, rtol=4e-3, atol=1e-6)
    buf = torch.empty(136, 640, device="cuda", dtype=torch.bfloat16)
    assert triton_int4.dequantize(packed, sz, group, out=buf, bn=16, bb=4).data_ptr() == buf.data_ptr()
    torch.testing.assert_close(buf.float(), ref, rtol=4e-3, atol=1e-6)
    # many rows: the op dequantizes and runs the dense GEMM
    x = torch.randn(triton_int4.GEMV_MAX_ROWS + 5, 640, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(torch.ops.modelcore.int4_linear(x, packed, sz, None, group).float(), x.float() @ ref.T,
                               rtol=2e-2, atol=5e-3)  # the bf16 weight


def test_cuda_int4_linear_matches_fallback() -> None:
    from modelcore import triton_int4
    from modelcore.model import dequantize_cuda_int4, linear
    from modelcore.quant import Int4Linear

    qws = [_int4_weight(n, k, 64, i) for i, (n, k) in enumerate([(384, 512), (512, 384), (256, 512)])]
    biases = [torch.randn(384, device="cuda"), None, torch.randn(256, device="cuda")]
    mods = [Int4Linear(q, b) for q, b in zip(qws, biases)]
    twins = [Int4Linear(q, b, kernel="fallback") for q, b in zip(qws, biases)]
    assert all(m.kernel == "packed" and m.packed.dtype == torch.uint8 for m in mods)
    for m, t in zip(mods, twins):
        for rows in (1, 3, triton_int4.GEMV_MAX_ROWS + 1, 300):  # the GEMV, then dequantize + dense GEMM
            x = torch.randn(rows, m.in_features, device="cuda", dtype=torch.bfloat16)
            # bf16 activations (and, from GEMV_MAX_ROWS + 1 rows, the bf16-rounded weight) against float32
            torch.testing.assert_close(linear(m, x).float(), t(x.float()).float(), rtol=2e-2, atol=1e-2)
        x = torch.randn(2, 3, m.in_features, device="cuda", dtype=torch.bfloat16)  # leading dims kept
        assert m(x).shape == (2, 3, m.out_features)
        w = dequantize_cuda_int4(m.packed, m.scales_and_zeros, m.group_size)  # the dense path's weight, exactly
        torch.testing.assert_close(w.float(), t.dequantized_weight(torch.float32), rtol=4e-3, atol=1e-6)


def test_graphed_generate_equals_eager_int4() -> None:
    from modelcore.quant import quantize_model

    model, _ = _tiny_qwen(torch.bfloat16)
    model.fuse_projections()
    quantize_model(model, "int4", group_size=32)
    assert model.model.layers[0].mlp.down_proj.packed.dtype == torch.uint8
    ids = torch.randint(0, 512, (2, 11), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    model.compile_decode = False  # the same kernels in the graph as eagerly
    graphed, eager = _graph_vs_eager(model, ids)
    assert torch.equal(graphed, eager)
