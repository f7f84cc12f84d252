"""The fused C decode step (modelcore/cpu_decode.py) against its naive twin, the torch layer stack."""
from __future__ import annotations

import copy

import pytest
import torch

from modelcore import cpu_int4
from modelcore.args import ModelArgs
from modelcore.cpu_decode import FUSED_PREFILL_MAX_TOKENS, FusedDecoder, fused_decoder, fused_prefill, supported
from modelcore.generate import decode_one_token
from modelcore.model import Transformer
from modelcore.quant import Int4Linear, quantize_model

pytestmark = pytest.mark.skipif(cpu_int4.library() is None, reason="the native kernel does not build here")


def _tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    shape = dict(dim=128, n_heads=4, n_kv_heads=2) | {k: kw.pop(k) for k in ("dim", "n_heads", "n_kv_heads") if k in kw}
    args = ModelArgs(vocab_size=512, n_layers=3, inter_dim=256, max_position_embeddings=128, **shape, **kw)
    model = Transformer(args).eval()
    with torch.no_grad():
        for layer in model.model.layers:  # non-trivial norms and biases
            layer.input_layernorm.weight.uniform_(0.5, 1.5)
            layer.post_attention_layernorm.weight.uniform_(0.5, 1.5)
            for name in ("q_proj", "k_proj", "v_proj"):
                b = getattr(layer.self_attn, name).bias
                if b is not None:
                    b.normal_(0, 0.5)
    quantize_model(model, "int4", group_size=32)
    model.fuse_projections()
    return model


@pytest.mark.parametrize("variant", [
    dict(),
    dict(attention_bias=True, rope_theta=1e6),  # Qwen2-style q/k/v bias
    dict(sliding_window=8),  # Mistral-style window, shorter than the sequence
    dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}),
])
def test_fused_steps_match_torch_stack(variant: dict) -> None:
    """20 teacher-forced decode steps after a 9-token prompt. Exact twin: the C step built with float activations
    (`cpu_int4.load("exact")`) against the torch stack on the same int4 codes dequantized (kernel="fallback"):
    final hidden states and the cache the C step wrote agree to 1e-4 of their scale. Product build (int8 activations):
    within 2% of the twin's logits (activation rounding)."""
    _check_steps(_tiny(**variant))


@pytest.mark.parametrize("shape", [
    dict(dim=256, n_heads=4, n_kv_heads=1),  # head width 64, 4 query heads per key/value head
    dict(dim=384, n_heads=6, n_kv_heads=2),  # 64, 3 (SmolLM2's grouping)
    dict(dim=256, n_heads=4, n_kv_heads=2),  # 64, 2
    dict(dim=256, n_heads=4, n_kv_heads=4),  # 64, 1
    dict(dim=256, n_heads=2, n_kv_heads=1),  # 128, 2
    dict(dim=256, n_heads=2, n_kv_heads=2, sliding_window=11),  # 128, 1, keys from a window start not a multiple of 8
])
def test_fused_steps_match_torch_stack_llama_head_shapes(shape: dict) -> None:
    """The attention built per head width (64, 128) and grouping, scoring 8 keys at a time: 9..29 keys, so full
    blocks of 8 and a remainder, checked as above."""
    _check_steps(_tiny(**shape))


def _check_steps(model: Transformer) -> None:
    assert supported(model)
    twin = copy.deepcopy(model)
    for mod in [m for m in twin.modules() if isinstance(m, Int4Linear)]:
        for parent in twin.modules():
            for name, child in list(parent.named_children()):
                if child is mod:
                    setattr(parent, name, Int4Linear(mod.int4_weights(), mod.bias, kernel="fallback"))
    ids = torch.randint(0, 512, (1, 29))
    caches = [model.new_cache(1, 64), model.new_cache(1, 64), model.new_cache(1, 64)]
    with torch.inference_mode():
        for c in caches:
            twin.forward_hidden(ids[:, :9], cache=c)
        exact = FusedDecoder(model, caches[0], kernel=cpu_int4.load(cpu_int4.EXACT))
        product = FusedDecoder(model, caches[2])
        for p in range(9, 29):
            a = exact.hidden(ids[:, p], [p])  # final-norm hidden state: the output head is the same module in both
            b = twin.forward_hidden(ids[:, p:p + 1], positions=torch.tensor([[p]]), cache=caches[1])
            torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)
            c = product.logits(ids[:, p], [p])
            ref = twin.lm_head(b)[:, -1]
            assert float((c - ref).norm() / ref.norm()) < 0.02
    for la, lb in zip(caches[0], caches[1]):
        torch.testing.assert_close(la.k[:, :, :29], lb.k[:, :, :29], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(la.v[:, :, :29], lb.v[:, :, :29], atol=1e-4, rtol=1e-4)


def test_generate_takes_the_fused_step() -> None:
    """generate() on one row runs the fused step: its greedy tokens equal a hand-written loop over FusedDecoder
    (fused prefill, then argmax of each fused step); copies of the model get their own decoder."""
    model = _tiny(attention_bias=True)
    ids = torch.randint(0, 512, (1, 7))
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=24)
        assert any(e[1] is not None for e in model.__dict__["_fused_decoder"].decs.values())
        cache = model.new_cache(1, 31)
        logits = fused_prefill(model, cache, ids.tolist())  # generate's prefill of a short prompt: the fused step too
        dec = FusedDecoder(model, cache)
        toks = []
        for p in range(7, 31):
            toks.append(int(logits.argmax(-1)))
            logits = dec.logits(torch.tensor([toks[-1]]), [p])
        twin = copy.deepcopy(model)
        assert not twin.__dict__["_fused_decoder"].decs
        assert torch.equal(twin.generate(ids, max_new_tokens=24), out)
    assert out[0, 7:].tolist() == toks


def test_decoders_do_not_keep_finished_caches_alive() -> None:
    """The model's slot holds caches weakly: once a generate call's cache is gone, nothing keeps its memory; a
    decoder whose cache tensors were replaced is rebuilt, and the stale one refuses to run."""
    import gc
    import weakref

    model = _tiny()
    cache = model.new_cache(1, 16)
    assert fused_decoder(model, cache) is fused_decoder(model, cache)  # built once per cache
    dec = fused_decoder(model, cache)
    cache[0].select_rows(torch.tensor([0]))  # new k/v tensors: the old decoder must not write into freed memory
    assert fused_decoder(model, cache) is not dec
    with pytest.raises(RuntimeError, match="gone or its tensors were replaced"):
        dec.hidden(torch.tensor([1]), [0])
    probe = weakref.ref(cache[0].k)
    del cache
    gc.collect()
    assert probe() is None


def test_unsupported_models_keep_the_torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    args = ModelArgs(vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, inter_dim=128, max_position_embeddings=64)
    float_model = Transformer(args).eval()
    assert not supported(float_model)  # float weights
    int8 = quantize_model(copy.deepcopy(float_model), "int8")
    assert not supported(int8)
    model = _tiny()
    monkeypatch.setenv("MODELCORE_FUSED_DECODE", "0")
    assert not supported(model)
    monkeypatch.delenv("MODELCORE_FUSED_DECODE")
    cache1 = model.new_cache(1, 16)
    dec = fused_decoder(model, cache1)
    with pytest.raises(ValueError, match="outside the cache"):
        dec.hidden(torch.tensor([1]), [16])
    with pytest.raises(ValueError, match="cache rows"):
        dec.hidden(torch.tensor([1, 2]), [0, 0])


def test_int8_head_takes_the_block_layout_kernel() -> None:
    """An int8 output head (SmolLM2's tied embedding) on an AVX512-VNNI build: FusedDecoder.logits runs it on a block-
    layout copy of the weight, built once; the logits equal the head module's own (row-major kernel) to float
    rounding, for 1 and 5 rows."""
    from modelcore.cpu_decode import head_blocks
    from modelcore.quant import Int8Linear

    model = _tiny()
    torch.manual_seed(3)
    model.lm_head = Int8Linear.from_linear(torch.nn.Linear(128, 512, bias=False), kernel="native")
    cache = model.new_cache(5, 32)
    dec = FusedDecoder(model, cache)
    if not dec.kernel.int8_blocked:
        pytest.skip("no AVX512-VNNI build here")
    blocks = head_blocks(model.lm_head, dec.kernel)
    assert blocks is not None and head_blocks(model.lm_head, dec.kernel)[0] is blocks[0]  # built once
    with torch.inference_mode():
        for b in (1, 5):
            toks, pos = torch.randint(0, 512, (b,)), torch.arange(b) + 3
            got = dec.logits(toks, pos)
            want = model.lm_head(dec.hidden(toks, pos))[:, -1]  # same K/V rewritten at the same positions
            assert got.shape == (b, 512)
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=0)


def test_fused_rows_at_different_positions_match_torch() -> None:
    """Three rows at different positions (ragged prompts, as in the Engine's batches and padded generate): the
    exact C build against the torch stack on the fallback twin, per row, over 6 steps."""
    model = _tiny(attention_bias=True, sliding_window=6)
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                setattr(parent, name, Int4Linear(child.int4_weights(), child.bias, kernel="fallback"))
    lens = [5, 11, 8]
    ids = torch.randint(0, 512, (3, 20))
    ca, cb = model.new_cache(3, 32), model.new_cache(3, 32)
    with torch.inference_mode():
        for c in (ca, cb):
            for r, n in enumerate(lens):  # prefill each row on its own into its row of the cache
                row = [type(lc)(1, 32, lc.k.shape[1], lc.k.shape[3], "cpu", torch.float32) for lc in c]
                twin.forward_hidden(ids[r:r + 1, :n], cache=row)
                for lc, lr in zip(c, row):
                    lc.k[r], lc.v[r] = lr.k[0], lr.v[0]
        dec = FusedDecoder(model, ca, kernel=cpu_int4.load(cpu_int4.EXACT))
        pos = torch.tensor(lens)
        for _ in range(6):
            toks = ids[torch.arange(3), pos]
            a = dec.hidden(toks, pos)
            b = twin.forward_hidden(toks[:, None], positions=pos[:, None], cache=cb)
            torch.testing.assert_close(a, b, atol=1e-4 * float(b.abs().max()), rtol=0)
            pos = pos + 1


@pytest.mark.parametrize("isa", cpu_int4.ISAS)
def test_every_instruction_set_decodes_like_the_exact_build(isa: str) -> None:
    """The AVX2 and plain-C builds (generic attention, their own matmuls) against the exact build on the same steps:
    within the int8-activation rounding (2%)."""
    from test_cpu_int4 import _kernel

    kern = _kernel(isa)
    model = _tiny(attention_bias=True)
    ids = torch.randint(0, 512, (2, 16))
    caches = [model.new_cache(2, 32), model.new_cache(2, 32)]
    with torch.inference_mode():
        for c in caches:
            model.forward_hidden(ids[:, :8], cache=c)
        ref, dec = FusedDecoder(model, caches[0], kernel=cpu_int4.load(cpu_int4.EXACT)), FusedDecoder(model, caches[1], kernel=kern)
        for p in range(8, 16):
            pos = torch.tensor([p, p])
            a, b = dec.hidden(ids[:, p], pos), ref.hidden(ids[:, p], pos)
            assert float((a - b).norm() / b.norm()) < 0.02


def _fallback_twin(model: Transformer) -> Transformer:
    twin = copy.deepcopy(model)
    for parent in list(twin.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int4Linear):
                setattr(parent, name, Int4Linear(child.int4_weights(), child.bias, kernel="fallback"))
    return twin


def test_fused_prefill_matches_torch() -> None:
    """Three prompts prefilled in one C call, rows mapped to cache rows 1..3 (not the identity), no padding, one
    prompt starting after a 4-token prefix already in its row, against the torch stack prefilling each prompt alone.
    Exact build: every token's hidden state and the cache to 1e-4 of their scale. Product path (fused_prefill):
    last-token logits within 2% of the twin's (int8 activations); too long an input is left to the torch path."""
    from modelcore.cache import KVCache

    model = _tiny(attention_bias=True, sliding_window=6)
    twin = _fallback_twin(model)
    lens, starts, rows = [5, 11, 8], [0, 4, 0], [1, 2, 3]
    ids = torch.randint(0, 512, (3, 12))
    prompts = [ids[i, :n].tolist() for i, n in enumerate(lens)]
    ca, cb, cc = model.new_cache(4, 32), model.new_cache(4, 32), model.new_cache(4, 32)
    with torch.inference_mode():
        ref = []
        for i, n in enumerate(lens):  # the twin: each prompt alone
            one = [KVCache(1, 32, lc.k.shape[1], lc.k.shape[3], "cpu", torch.float32) for lc in cb]
            ref.append(twin.forward_hidden(ids[i:i + 1, :n], cache=one)[0])  # (n, D)
            for lc, lo in zip(cb, one):
                lc.k[rows[i]], lc.v[rows[i]] = lo.k[0], lo.v[0]
        for c in (ca, cc):  # the prefix of prompt 1, as the Engine's prefix store would copy it
            for lc, lb in zip(c, cb):
                lc.k[2, :, :4], lc.v[2, :, :4] = lb.k[2, :, :4], lb.v[2, :, :4]
        dec = FusedDecoder(model, ca, kernel=cpu_int4.load(cpu_int4.EXACT))
        toks = torch.tensor([t for p, s in zip(prompts, starts) for t in p[s:]])
        pos = torch.tensor([q for p, s in zip(prompts, starts) for q in range(s, len(p))])
        crow = torch.tensor([r for p, s, r in zip(prompts, starts, rows) for _ in range(s, len(p))])
        got = dec.hidden(toks, pos, crow)[:, 0]  # (T, D)
        want = torch.cat([h[s:] for h, s in zip(ref, starts)])
        torch.testing.assert_close(got, want, atol=1e-4 * float(want.abs().max()), rtol=0)
        for la, lb in zip(ca, cb):
            for i, n in enumerate(lens):
                torch.testing.assert_close(la.k[rows[i], :, :n], lb.k[rows[i], :, :n], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(la.v[rows[i], :, :n], lb.v[rows[i], :, :n], atol=1e-4, rtol=1e-4)
        logits = fused_prefill(model, cc, prompts, starts, rows)
        for i in range(3):
            r = twin.lm_head(ref[i][-1:])[0]
            assert float((logits[i] - r).norm() / r.norm()) < 0.02
        with pytest.raises(ValueError, match="cache_rows"):
            dec.hidden(toks[:2], pos[:2], torch.tensor([0, 4]))
        big = model.new_cache(2, FUSED_PREFILL_MAX_TOKENS + 8)
        assert fused_prefill(model, big, [[1] * (FUSED_PREFILL_MAX_TOKENS // 2 + 1)] * 2) is None
