"""The colocated weight-sync GPU benchmark's CPU smoke mode: the same export -> flattened bucket ->
second process -> HF model path (tensors by value instead of CUDA IPC), every HF tensor verified
against the policy's own export by the benchmark itself (it exits non-zero on a mismatch)."""
import json
import os
import subprocess
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]


def test_cpu_tiny_smoke_delivers_every_tensor(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(_REPO))
    proc = subprocess.run([sys.executable, str(_REPO / "benchmarks" / "weight_sync_gpu.py"), "--device", "cpu", "--tiny",
                           "--repeats", "1", "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert len(rows) == 3 and all(row["verified"] is True for row in rows[:2])
    # both payload kinds moved the same bytes (the benchmark checked every tensor by name and value)
    assert result["raw"]["views"]["bytes"] == result["raw"]["flatten"]["bytes"] > 0
