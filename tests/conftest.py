"""Shared test settings: where the real documents and evaluation sets live."""
from pathlib import Path

import pytest

SHARED = (Path(__file__).resolve().parent.parent.parent / "shared").resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    assert SHARED.is_dir(), f"../shared not found at {SHARED}"
    return SHARED
