"""The generator behind answers and reports: the model profile's Engine, or none (extractive only)."""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

from django.conf import settings

log = logging.getLogger(__name__)


def profile_for(*, purpose: str):
    """The ModelProfile assigned to 'qa' or 'reports', or None for the built-in default."""
    from knowledge.portal.models import ModelProfile

    field = "use_for_reports" if purpose == "reports" else "use_for_qa"
    return ModelProfile.objects.filter(**{field: True}).order_by("id").first()


DEFAULT_MAX_NEW_TOKENS = 96


def max_new_tokens_for(*, purpose: str) -> int:
    profile = profile_for(purpose=purpose)
    return profile.max_new_tokens if profile else DEFAULT_MAX_NEW_TOKENS


def generator_dtype() -> str | None:
    """KD_GENERATOR_DTYPE, else bfloat16 on CPUs with bf16 units (no GPU), else the checkpoint's own dtype."""
    if settings.KD_GENERATOR_DTYPE:
        return settings.KD_GENERATOR_DTYPE
    import torch

    from modelcore.defaults import cpu_has_native_bf16

    return "bfloat16" if not torch.cuda.is_available() and cpu_has_native_bf16() else None


@functools.lru_cache(maxsize=16)
def default_quantization(path: str | None) -> str | None:
    """With no quantization asked for: "int4" for a GGUF stored in Q4_0/Q4_1 (the default SmolLM2 file), which keeps
    its own codes and decodes on modelcore's int4 kernels (Engine, one stream: ~165 against ~45 tok/s in bf16 on
    the project's CPUs, prefill as fast); None (the checkpoint's own weights) for anything else. Cached: reading
    a GGUF's tensor table parses its whole header (~2 s for SmolLM2's 49k-token vocabulary), once per path."""
    from modelcore.defaults import default_generator_path
    from modelcore.gguf import stores_int4

    try:
        return "int4" if stores_int4(path or default_generator_path()) else None
    except Exception:  # noqa: BLE001 - an unreadable file is reported by Engine.get itself
        return None


def engine_modes(profile) -> dict:
    """The profile's attention/routing modes as Engine.get keyword arguments (None: the model's own)."""
    return {"attention": (profile.attention_mode if profile else "") or None,
            "routing": (profile.routing_mode if profile else "") or None}


def engine_for(*, purpose: str):
    """The in-process Engine for this purpose, or None (extractive answers) when switched off or not loadable.

    ``settings.KD_ANSWER_WITH_MODEL = False`` switches generation off: answers then quote the sources.
    The profile's checkpoint, quantization and attention/routing modes reach ``Engine.get``; a profile the
    checkpoint cannot run (a mode it lacks, saved around the admin form's check) is logged and answered
    extractively rather than failing the question.
    """
    if not settings.KD_ANSWER_WITH_MODEL:
        return None
    profile = profile_for(purpose=purpose)
    path = (profile.checkpoint_path if profile else "") or settings.KD_GENERATOR_MODEL or None
    quant = (profile.quantization if profile else "") or settings.KD_GENERATOR_QUANTIZATION or default_quantization(path)
    quant = None if quant == "none" else quant  # KD_GENERATOR_QUANTIZATION=none: the checkpoint's own weights
    modes = engine_modes(profile)
    try:
        from modelcore.engine import Engine

        return Engine.get(path=path, quantization=quant, dtype=generator_dtype(), **modes)
    except Exception as exc:  # noqa: BLE001 - any load failure means: answer extractively
        log.warning("generator unavailable for %s (profile %r, modes %s), answering extractively: %s", purpose,
                    profile.name if profile else None, modes, exc)
        return None


def stream_text(*, engine, messages: list[dict], max_new_tokens: int, stop: list[str] | None = None) -> Iterator[str]:
    """Stream pieces of the model's reply; cancels the request when the consumer stops early."""
    req = engine.submit(messages=messages, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop or [])
    finished = False
    try:
        for piece in req:
            if piece:
                yield piece
        finished = True
    finally:
        if not finished:
            req.cancel()
