"""`python -m modelcore bench`: the llama.cpp row runs in its own venv and reports the same figures as ours."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modelcore import bench

LLAMA_PY = Path(os.environ.get("KD_LLAMA_PYTHON", "/tmp/llamavenv/bin/python"))


@pytest.mark.skipif(not LLAMA_PY.exists(), reason=f"no llama-cpp-python venv at {LLAMA_PY} (README: the llama.cpp row)")
def test_llamacpp_row_has_our_figures(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    bench.main(["--engines", "llamacpp", "--threads", "1", "--decode-tokens", "4", "--prefill-lengths", "64",
                "--llama-python", str(LLAMA_PY), "--out", str(out)])
    row = json.loads(out.read_text())["results"]["llamacpp"]
    assert "error" not in row, row
    for key in ("prefill_64_tok_s", "decode_b1_tok_s", "decode_b8_tok_s", "ttft_194_s", "load_s", "peak_rss_mb"):
        assert isinstance(row[key], (int, float)) and row[key] > 0, (key, row)
    assert row["llama_cpp_python"] == "0.3.36"


def test_missing_llama_venv_is_a_skipped_row(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    bench.main(["--engines", "llamacpp", "--llama-python", str(tmp_path / "nope" / "python"), "--out", str(out)])
    assert "skipped" in json.loads(out.read_text())["results"]["llamacpp"]
