"""CUDA decode path (runs only where CUDA is present; the GPU benchmarks run it too).

* generate() on CUDA replays a captured (and torch.compile'd) decode step over a static cache: its greedy tokens
  must equal the eager step's, for a GQA model (float32) and a DeepSeek-V2 MLA + MoE model (bfloat16, packed experts).
* the int4 prefill path dequantizes CUDA's tiled int4 layout: the weight read back must be exactly what the kernel
  multiplies by, so the dense-GEMM prefill matches the int4 kernel.
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


def test_cuda_int4_dense_prefill_matches_kernel() -> None:
    from modelcore.model import PREFILL_DEQUANT_ROWS, dequantize_cuda_int4, linear
    from modelcore.quant import Int4Linear, quantize_int4

    torch.manual_seed(3)
    w = torch.randn(384, 512, device="cuda") * 0.02
    qw = quantize_int4(w, group_size=128)
    lin = Int4Linear(qw, None)
    assert lin.kernel == "packed" and lin.packed.is_cuda
    deq = dequantize_cuda_int4(lin.packed, lin.scales_and_zeros, 128, 384, 512)
    torch.testing.assert_close(deq.float(), qw.dequantize(torch.float32), rtol=0.01, atol=2e-4)  # bf16 scales/zeros
    from modelcore import triton_int4
    from modelcore.model import _cuda_int4_tile_order, _dequantize_cuda_int4

    twin = _dequantize_cuda_int4(lin.packed, lin.scales_and_zeros, _cuda_int4_tile_order(w.device), 128, 384, 512)
    torch.testing.assert_close(deq.float(), twin.float(), rtol=0.01, atol=5e-4)  # Triton rounds once, the twin per op
    if triton_int4.available():
        buf = torch.empty(384, 512, device="cuda", dtype=torch.bfloat16)
        tri = triton_int4.dequantize_tiled(lin.packed, lin.scales_and_zeros, _cuda_int4_tile_order(w.device), 128, 384, 512, out=buf)
        assert tri.data_ptr() == buf.data_ptr()  # the opt-in Triton kernel (MODELCORE_INT4_TRITON=1) reads the same layout
        torch.testing.assert_close(tri.float(), twin.float(), rtol=0.01, atol=5e-4)
    x = torch.randn(PREFILL_DEQUANT_ROWS + 7, 512, device="cuda", dtype=torch.bfloat16)
    kernel, dense = lin(x), linear(lin, x)
    cos = torch.nn.functional.cosine_similarity(kernel.float(), dense.float(), dim=-1)
    assert float(cos.min()) > 0.9999, float(cos.min())
    one = lin(x[:1]).float()  # one token through the kernel vs the float weight: the kernel is exact up to bf16
    ref = x[:1].float() @ qw.dequantize(torch.float32).T
    assert float(torch.nn.functional.cosine_similarity(one, ref).min()) > 0.999
