"""MLA (absorbed vs naive, compressed cache) and DeepSeekMoE (gate, dispatch vs per-token loop) unit checks."""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from modelcore.args import ModelArgs
from modelcore.deepseek_config import deepseek_config_to_args, split_fused_experts
from modelcore.errors import CheckpointError, UnknownArchitectureError
from modelcore.mla import MLA, LatentCache, mla_softmax_scale
from modelcore.moe import MoE, pack_experts

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale": 1.0,
        "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is far faster than two on a shared, busy CI box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mla_args(**kw) -> ModelArgs:
    base = dict(model_type="deepseek_v3", attention="mla", vocab_size=64, dim=48, n_layers=1, n_heads=4, inter_dim=64,
                q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10,
                max_position_embeddings=128)
    base.update(kw)
    return ModelArgs(**base)


def moe_args(**kw) -> ModelArgs:
    base = dict(model_type="deepseek_v3", attention="mla", vocab_size=64, dim=32, n_layers=2, n_heads=4, inter_dim=48,
                n_routed_experts=16, n_shared_experts=2, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                score_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True, route_scale=2.5, moe_inter_dim=24)
    base.update(kw)
    return ModelArgs(**base)


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm weights around 1, correction bias non-zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point():
                continue
            if name.endswith("layernorm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.3 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


@pytest.mark.parametrize("q_lora_rank", [0, 20])
@pytest.mark.parametrize("interleave,scaling", [(True, None), (False, YARN)])
def test_mla_absorbed_matches_naive_through_cache(q_lora_rank: int, interleave: bool, scaling) -> None:
    args = mla_args(q_lora_rank=q_lora_rank, rope_scaling=scaling, extra={"rope_interleave": interleave})
    mla = MLA(args).eval()
    randomise(mla, 1)
    b, t, steps = 2, 9, 6
    x = torch.randn(b, t + steps, args.dim, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(t + steps).expand(b, -1)
    outs = {impl: _through_cache(mla, x, t, impl) for impl in ("naive", "absorb")}
    assert_close(outs["absorb"], outs["naive"], rtol=1e-5, atol=1e-5)
    mla.impl = "naive"
    with torch.no_grad():
        full = mla(x, pos, None, _mask(pos, t + steps))  # no cache at all
    assert_close(outs["absorb"], full, rtol=1e-5, atol=1e-5)
    assert full.abs().max() > 1e-3  # the comparison is not between zeros


def _through_cache(mla: MLA, x: torch.Tensor, t: int, impl: str) -> torch.Tensor:
    """Prefill x[:, :t] into a fresh cache, then decode the rest one token at a time with `impl`."""
    mla.impl = impl
    b, n, _ = x.shape
    pos = torch.arange(n).expand(b, -1)
    cache = mla.new_cache(b, n + 4, "cpu", torch.float32)
    with torch.no_grad():
        pieces = [mla(x[:, :t], pos[:, :t], cache, _mask(pos[:, :t], t))]
        for i in range(t, n):
            pieces.append(mla(x[:, i:i + 1], pos[:, i:i + 1], cache, _mask(pos[:, i:i + 1], i + 1)))
    return torch.cat(pieces, dim=1)


def test_mla_absorbed_with_quantized_kv_b_proj() -> None:
    from modelcore.quant import Int8Linear

    args = mla_args(kv_lora_rank=32)
    mla = MLA(args).eval()
    randomise(mla, 13)
    mla.kv_b_proj = Int8Linear.from_linear(mla.kv_b_proj, kernel="fallback")  # no float .weight any more
    x = torch.randn(2, 12, args.dim, generator=torch.Generator().manual_seed(14))
    naive, absorbed = _through_cache(mla, x, 8, "naive"), _through_cache(mla, x, 8, "absorb")
    assert_close(absorbed, naive, rtol=1e-5, atol=1e-5)


def _mask(q_pos: torch.Tensor, s: int) -> torch.Tensor:
    return torch.arange(s)[None, None, None, :] <= q_pos[:, None, :, None]  # (B, 1, T, S)


def test_mla_cache_holds_only_latent_and_rope_key() -> None:
    with torch.device("meta"):  # DeepSeek-V3 sizes, no memory spent
        v3 = mla_args(dim=7168, n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128)
        cache = MLA(v3).new_cache(3, 100, "meta", torch.bfloat16)
    assert isinstance(cache, LatentCache)
    assert tuple(cache.kv.shape) == (3, 1, 100, 576)  # (B, 1, max_len, kv_lora_rank + qk_rope_head_dim)
    assert cache.kv.numel() // (3 * 100) == 512 + 64


def test_mla_per_row_positions_and_row_helpers() -> None:
    args = mla_args()
    mla = MLA(args).eval()
    randomise(mla, 3)
    g = torch.Generator().manual_seed(4)
    x, nxt = torch.randn(2, 5, args.dim, generator=g), torch.randn(2, 1, args.dim, generator=g)
    lengths = [3, 5]  # row 0: 3-token prompt + 2 right pads (positions 3, 4), row 1: 5 tokens
    refs = []
    for r, n in enumerate(lengths):  # each row alone
        c = mla.new_cache(1, 16, "cpu", torch.float32)
        p = torch.arange(n)[None]
        with torch.no_grad():
            mla(x[r:r + 1, :n], p, c, _mask(p, n))
            refs.append(mla(nxt[r:r + 1], torch.tensor([[n]]), c, _mask(torch.tensor([[n]]), n + 1)))
    cache = mla.new_cache(2, 16, "cpu", torch.float32)
    pos = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        mla(x, pos, cache, _mask(pos, 5))
        step = torch.tensor([[3], [5]])  # rows at different offsets; row 0 overwrites its pad slot 3
        out = mla(nxt, step, cache, _mask(step, 6))
    assert_close(out, torch.cat(refs), rtol=1e-5, atol=1e-5)
    cache.copy_row(1, 0)
    assert_close(cache.kv[0], cache.kv[1])
    cache.select_rows(torch.tensor([1]))
    assert cache.batch == 1 and tuple(cache.kv.shape) == (1, 1, 16, args.kv_lora_rank + args.qk_rope_head_dim)


def test_mla_yarn_softmax_scale() -> None:
    plain = mla_softmax_scale(mla_args())
    assert plain == pytest.approx(20 ** -0.5)
    m = 0.1 * 0.707 * torch.log(torch.tensor(4.0)).item() + 1
    assert mla_softmax_scale(mla_args(rope_scaling=YARN)) == pytest.approx(20 ** -0.5 * m * m)


def reference_route(gate, x: torch.Tensor) -> list[dict[int, float]]:
    """Per-token, plain-Python routing from the DeepSeek papers' description (the twin of Gate.forward)."""
    routes = []
    for row in x:
        logits = [float(v) for v in (gate.weight.detach().float() @ row.float())]
        if gate.score_func == "softmax":
            z = max(logits)
            ex = [pow(2.718281828459045, v - z) for v in logits]
            scores = [v / sum(ex) for v in ex]
        else:
            scores = [1 / (1 + pow(2.718281828459045, -v)) for v in logits]
        bias = gate.e_score_correction_bias
        choice = [s + (float(bias[i]) if bias is not None else 0.0) for i, s in enumerate(scores)]
        allowed = set(range(gate.n_experts))
        if gate.topk_method != "greedy" and gate.n_groups > 1:
            per = gate.n_experts // gate.n_groups
            groups = [choice[g * per:(g + 1) * per] for g in range(gate.n_groups)]
            gscore = [sum(sorted(grp)[-2:]) if gate.topk_method == "noaux_tc" else max(grp) for grp in groups]
            kept = sorted(range(gate.n_groups), key=lambda g: -gscore[g])[: gate.n_limited_groups]
            allowed = {g * per + j for g in kept for j in range(per)}
        chosen = sorted(allowed, key=lambda e: -choice[e])[: gate.top_k]
        w = {e: scores[e] for e in chosen}
        if gate.norm_topk_prob:
            total = sum(w.values()) + 1e-20
            w = {e: v / total for e, v in w.items()}
        routes.append({e: v * gate.route_scale for e, v in w.items()})
    return routes


@pytest.mark.parametrize("kind", ["v3_noaux_tc", "v2_group_limited", "v2_greedy"])
def test_gate_matches_per_token_reference(kind: str) -> None:
    args = {"v3_noaux_tc": moe_args(),
            "v2_group_limited": moe_args(score_func="softmax", topk_method="group_limited_greedy", norm_topk_prob=False,
                                         route_scale=1.0),
            "v2_greedy": moe_args(score_func="softmax", topk_method="greedy", n_expert_groups=1, n_limited_groups=1,
                                  norm_topk_prob=False, route_scale=16.0)}[kind]
    moe = MoE(args).eval()
    randomise(moe, 5)
    x = torch.randn(40, args.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        weights, idx = moe.gate(x)
    ref = reference_route(moe.gate, x)
    for n in range(x.shape[0]):
        got = {int(e): float(w) for e, w in zip(idx[n], weights[n])}
        assert set(got) == set(ref[n]), f"token {n}: experts {sorted(got)} != {sorted(ref[n])}"
        for e in got:
            assert got[e] == pytest.approx(ref[n][e], rel=1e-5, abs=1e-6)
    if args.topk_method != "greedy":  # every token's experts lie in at most n_limited_groups groups
        per = args.n_routed_experts // args.n_expert_groups
        assert max(len({int(e) // per for e in row}) for row in idx) <= args.n_limited_groups


def test_correction_bias_steers_choice_but_not_weights() -> None:
    moe = MoE(moe_args(n_expert_groups=1, n_limited_groups=1, norm_topk_prob=False, route_scale=1.0)).eval()
    randomise(moe, 7)
    x = torch.randn(8, moe.dim, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        moe.gate.e_score_correction_bias.zero_()
        moe.gate.e_score_correction_bias[3] = 10.0  # expert 3 always chosen, weight still its own sigmoid score
        weights, idx = moe.gate(x)
        scores = torch.sigmoid(x @ moe.gate.weight.T)
    assert (idx == 3).any(-1).all()
    assert_close(weights, scores.gather(1, idx))


@pytest.mark.parametrize("score_func,topk_method", [("sigmoid", "noaux_tc"), ("softmax", "group_limited_greedy")])
def test_moe_dispatch_matches_loop_and_runs_only_routed_experts(score_func: str, topk_method: str) -> None:
    args = moe_args(score_func=score_func, topk_method=topk_method, n_routed_experts=32, n_expert_groups=8,
                    n_limited_groups=1, n_activated_experts=2)
    moe = MoE(args).eval()
    randomise(moe, 9)
    x = torch.randn(1, 3, args.dim, generator=torch.Generator().manual_seed(10))  # 3 tokens x 2 experts: most idle
    calls: dict[int, int] = {}
    hooks = [e.register_forward_hook(lambda m, i, o, j=j: calls.__setitem__(j, calls.get(j, 0) + 1))
             for j, e in enumerate(moe.experts)]
    with torch.no_grad():
        out = moe(x)
        _, idx = moe.gate(x.view(-1, args.dim))
    routed = set(idx.flatten().tolist())
    assert set(calls) == routed, f"experts run {sorted(calls)} but routed {sorted(routed)}"
    assert all(c == 1 for c in calls.values())  # each hit expert runs once, on all its tokens together
    assert len(routed) < args.n_routed_experts
    calls.clear()
    with torch.no_grad():
        ref = moe.forward_loop(x)
    for h in hooks:
        h.remove()
    assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert out.abs().max() > 1e-3


def test_moe_pack_keeps_weights_and_outputs() -> None:
    moe = MoE(moe_args()).eval()
    randomise(moe, 11)
    x = torch.randn(2, 7, moe.dim, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        before = moe(x)
        assert pack_experts(moe) == 1 and pack_experts(moe) == 0  # packs once
        w13, w2 = moe.packed
        w13[5, 0, 0] = 123.0  # the expert Linears are views into the stacks
        assert moe.experts[5].gate_proj.weight[0, 0] == 123.0
        moe.shared_w13[-1, 0] = 7.0  # so are the shared experts' gate and up
        assert moe.shared_experts.up_proj.weight[-1, 0] == 7.0
    randomise(moe, 11)  # same seed: same weights, written through the views
    with torch.no_grad():
        after = moe(x)  # CPU: still the sorted dispatch, on the packed storage
    assert_close(after, before)


def hf_config(model_type: str, **kw) -> dict:
    c = {"model_type": model_type, "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 128, "kv_lora_rank": 16, "q_lora_rank": None,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "n_routed_experts": 8, "num_experts_per_tok": 2,
         "n_group": 4, "topk_group": 2, "moe_intermediate_size": 16, "n_shared_experts": 1, "first_k_dense_replace": 1,
         "routed_scaling_factor": 2.5, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
    c.update(kw)
    return c


def test_v3_config_defaults_follow_transformers() -> None:
    args = deepseek_config_to_args(hf_config("deepseek_v3", norm_topk_prob=True))  # no scoring_func / topk_method keys
    assert (args.attention, args.score_func, args.topk_method) == ("mla", "sigmoid", "noaux_tc")
    assert args.n_kv_heads == args.n_heads == 4  # num_key_value_heads=128 is meaningless for MLA
    assert args.norm_topk_prob and args.route_scale == 2.5 and args.extra["rope_interleave"] is True
    assert [args.is_moe_layer(i) for i in range(2)] == [False, True]
    v2 = deepseek_config_to_args(hf_config("deepseek_v2", topk_method="group_limited_greedy", norm_topk_prob=True))
    assert (v2.score_func, v2.topk_method, v2.norm_topk_prob) == ("softmax", "group_limited_greedy", False)


def test_bad_deepseek_configs_are_rejected_clearly() -> None:
    with pytest.raises(UnknownArchitectureError, match="topk_method"):
        deepseek_config_to_args(hf_config("deepseek_v2", topk_method="bogus"))
    with pytest.raises(UnknownArchitectureError, match="multiple of n_group"):
        deepseek_config_to_args(hf_config("deepseek_v3", n_group=3))
    with pytest.raises(UnknownArchitectureError, match="not a DeepSeek"):
        deepseek_config_to_args(hf_config("llama"))


def test_split_fused_experts() -> None:
    e, i, d = 3, 4, 5
    gate_up, down = torch.randn(e, 2 * i, d), torch.randn(e, d, i)
    sd = split_fused_experts({"model.layers.1.mlp.experts.gate_up_proj": gate_up,
                              "model.layers.1.mlp.experts.down_proj": down, "model.norm.weight": torch.ones(d)})
    assert len(sd) == 3 * e + 1
    assert_close(sd["model.layers.1.mlp.experts.2.gate_proj.weight"], gate_up[2, :i])
    assert_close(sd["model.layers.1.mlp.experts.2.up_proj.weight"], gate_up[2, i:])
    assert_close(sd["model.layers.1.mlp.experts.0.down_proj.weight"], down[0])
    with pytest.raises(CheckpointError, match="3-D"):
        split_fused_experts({"model.layers.1.mlp.experts.down_proj": torch.randn(4, 4)})
