"""Exceptions raised by modelcore: every bad input ends in one of these with a clear message."""
from __future__ import annotations


class ModelCoreError(Exception):
    """Base class of every modelcore error."""


class ModelNotFoundError(ModelCoreError, FileNotFoundError):
    """The model path does not exist or lacks the files needed."""


class CheckpointError(ModelCoreError):
    """A checkpoint file is corrupt, truncated or inconsistent with its config."""


class UnknownArchitectureError(ModelCoreError):
    """config.json names a model_type / architecture that modelcore does not implement."""


class PromptError(ModelCoreError, ValueError):
    """The prompt is empty or longer than the model's context."""


class GenerationConfigError(ModelCoreError, ValueError):
    """Invalid generation or sampling parameters."""


class TokenizerError(ModelCoreError):
    """The tokenizer files are missing or cannot be used."""
