"""Model profiles: which attention/routing modes a checkpoint has, read from its config without loading weights.

The modes themselves are applied by modelcore (``Engine.get(..., attention=, routing=)``); this module lets the
admin form refuse a profile the Engine would refuse, with a reason a person can act on, before it is saved.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.exceptions import ValidationError
from django.utils.translation import gettext as _

ATTENTION_MODES = ("absorbed", "naive")  # as modelcore.auto.ATTENTION_MODES
ROUTING_MODES = ("dispatch", "loop")  # as modelcore.auto.ROUTING_MODES
QUANTIZATIONS = ("int8", "int4")


@dataclass(frozen=True)
class CheckpointKind:
    """What the profile form needs to know about a generator checkpoint."""

    path: str
    family: str  # model_type from the config (llama, qwen2, deepseek_v2, ...)
    mla: bool  # multi-head latent attention: attention modes apply
    moe: bool  # routed experts: routing modes apply


def checkpoint_path_for(checkpoint_path: str) -> Path:
    """The checkpoint a profile names; blank: KD_GENERATOR_MODEL, else the built-in default (as engine_for)."""
    if checkpoint_path:
        return Path(checkpoint_path)
    if settings.KD_GENERATOR_MODEL:
        return Path(settings.KD_GENERATOR_MODEL)
    from modelcore.defaults import default_generator_path

    return default_generator_path()


def checkpoint_kind(path: Path) -> CheckpointKind:
    """Read a .gguf's metadata or a folder's config.json; ValueError with the reason when it is not a generator."""
    if not path.exists():
        raise ValueError(_("%(path)s does not exist on this server.") % {"path": path})
    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise ValueError(_("%(path)s is a file but not a .gguf; give a .gguf file or a model folder.")
                                 % {"path": path})
            from modelcore.gguf import model_args, open_gguf

            args = model_args(open_gguf(path))
        else:
            import json

            cfg = path / "config.json"
            if cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("model_type") == "bert":
                raise ValueError(_("%(path)s is an encoder (BERT), not a generator.") % {"path": path})
            from modelcore.loading import load_config

            args = load_config(path)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - modelcore's errors name the problem; show it
        raise ValueError(_("%(path)s is not a checkpoint this server can load: %(error)s") % {"path": path, "error": exc}) from exc
    return CheckpointKind(path=str(path), family=args.model_type, mla=args.attention == "mla",
                          moe=args.n_routed_experts > 0)


def profile_check(*, checkpoint_path: str, quantization: str, attention_mode: str, routing_mode: str) -> CheckpointKind:
    """Raise ValidationError (per field) when the checkpoint cannot be read or lacks a chosen mode."""
    errors: dict[str, str] = {}
    if quantization and quantization not in QUANTIZATIONS:
        errors["quantization"] = _("Quantization must be empty (the checkpoint's own), int8 or int4.")
    if attention_mode and attention_mode not in ATTENTION_MODES:
        errors["attention_mode"] = _("Unknown attention mode %(mode)r.") % {"mode": attention_mode}
    if routing_mode and routing_mode not in ROUTING_MODES:
        errors["routing_mode"] = _("Unknown routing mode %(mode)r.") % {"mode": routing_mode}
    try:
        kind = checkpoint_kind(checkpoint_path_for(checkpoint_path))
    except ValueError as exc:
        errors["checkpoint_path"] = str(exc)
        raise ValidationError(errors) from exc
    if attention_mode in ATTENTION_MODES and not kind.mla:
        errors["attention_mode"] = _(
            "The attention mode %(mode)r applies to MLA checkpoints (DeepSeek-V2/V3); %(path)s (%(family)s) uses "
            "standard grouped-query attention. Leave the attention mode empty.") % {
            "mode": attention_mode, "path": Path(kind.path).name, "family": kind.family}
    if routing_mode in ROUTING_MODES and not kind.moe:
        errors["routing_mode"] = _(
            "The routing mode %(mode)r applies to mixture-of-experts checkpoints; %(path)s (%(family)s) has no "
            "routed experts. Leave the routing mode empty.") % {
            "mode": routing_mode, "path": Path(kind.path).name, "family": kind.family}
    if errors:
        raise ValidationError(errors)
    return kind
