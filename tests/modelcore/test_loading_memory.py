"""Loading is memory-mapped and copy-free: peak RSS while loading stays within 1.3x of the model's own size."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SAVE = r"""
import sys, torch
from modelcore.args import ModelArgs
from modelcore.model import Transformer
torch.manual_seed(0)
args = ModelArgs(model_type="llama", vocab_size=32000, dim=512, n_layers=6, n_heads=8, n_kv_heads=4, inter_dim=1536,
                 max_position_embeddings=512, eos_token_id=[2])
Transformer(args).save_pretrained(sys.argv[1])
"""

LOAD = r"""
import json, sys, torch
from modelcore import AutoModel
import modelcore.auto, modelcore.loading, modelcore.model, modelcore.tokenizer  # code imported before the baseline
from modelcore.args import ModelArgs
with torch.device("meta"):  # first use of the meta device imports torch's prims/dynamo code (~75 MB): not data
    modelcore.model.Transformer(ModelArgs(vocab_size=8, dim=8, n_layers=1, n_heads=2, inter_dim=8))
def status_mb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024
try:  # reset the high-water mark (VmHWM) so import-time peaks do not count; ru_maxrss would also carry pytest's peak
    open("/proc/self/clear_refs", "w").write("5")
except OSError:
    pass
base = status_mb("VmRSS")
model = AutoModel.from_pretrained(sys.argv[1], device_map="cpu")
total = sum(float(p.sum()) for p in model.parameters())  # touch every page
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
peak = status_mb("VmHWM")
logits = model(torch.tensor([[1, 2, 3]])).logits
print(json.dumps({"base_mb": base, "peak_mb": peak, "final_mb": status_mb("VmRSS"),
                  "model_mb": nbytes / 2**20, "finite": bool(torch.isfinite(logits).all())}))
"""


def test_peak_rss_while_loading_is_close_to_model_size(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "true"}
    subprocess.run([sys.executable, "-c", SAVE, str(tmp_path)], check=True, env=env, cwd=REPO, timeout=300)
    size_mb = (tmp_path / "model.safetensors").stat().st_size / 2**20
    assert 180 < size_mb < 260
    res = subprocess.run([sys.executable, "-c", LOAD, str(tmp_path)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["finite"]
    assert abs(m["model_mb"] - size_mb) < 5
    grown = m["peak_mb"] - m["base_mb"]
    assert grown <= 1.3 * m["model_mb"], m
    assert m["final_mb"] - m["base_mb"] >= 0.8 * m["model_mb"], m  # the weights really are resident after touching them
