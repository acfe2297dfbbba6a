"""The converter CLIs end to end (subprocess), and HF -> Megatron split over several processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.helpers.hf_models import save_hf_model
from tests.helpers.multiproc import run_distributed
from tests.tools._convert_cases import convert_case

REPO = Path(__file__).resolve().parents[2]


def _run(tool: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / tool), *args], capture_output=True, text=True,
                          env=env, timeout=300)


def _hf_tensors(path: Path) -> dict:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in set(index.values()):
        out.update(load_file(path / shard))
    assert set(out) == set(index)
    return out


def test_cli_round_trip_with_tokenizer_files_and_shard_size(tmp_path):
    model = save_hf_model("mistral", tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 256}))
    (tmp_path / "hf" / "chat_template.jinja").write_text("{{ messages }}")
    res = _run("convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "meg"),
               "--tp", "2", "--pp", "2", "--dtype", "bf16")
    assert res.returncode == 0, res.stderr
    assert "100.0%" in res.stderr and "GB/s" in res.stderr  # progress lines
    res = _run("convert_megatron_to_hf.py", "--megatron-dir", str(tmp_path / "meg"), "--out-dir", str(tmp_path / "back"),
               "--max-shard-size", "40KB", "--quiet")
    assert res.returncode == 0, res.stderr
    back = tmp_path / "back"
    tensors = _hf_tensors(back)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensors[key], tensor.to(torch.bfloat16)), key
    shard_bytes = [p.stat().st_size for p in back.glob("*.safetensors")]
    assert len(shard_bytes) > 3 and max(shard_bytes) < 40_000 + 64 * 320 * 2 + 4096  # <= cap, or one big tensor
    assert json.loads((back / "tokenizer_config.json").read_text()) == {"model_max_length": 256}
    assert (back / "chat_template.jinja").read_text() == "{{ messages }}"


def test_cli_errors_are_one_line(tmp_path):
    save_hf_model("qwen2", tmp_path / "hf")
    (tmp_path / "hf" / "config.json").unlink()
    res = _run("convert_hf_to_megatron.py", "--hf-dir", str(tmp_path / "hf"), "--out-dir", str(tmp_path / "meg"))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    error_lines = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert error_lines == [f"error: {tmp_path / 'hf' / 'config.json'}: HF config.json not found"]
    assert not (tmp_path / "meg").exists()


def test_conversion_split_over_two_processes(tmp_path):
    model = save_hf_model("qwen3", tmp_path / "hf")
    run_distributed(convert_case, 2, str(tmp_path / "hf"), str(tmp_path / "meg"), str(tmp_path / "back"),
                    str(tmp_path / "driver"), 2, 2, 30_000, timeout_s=240)
    meg = tmp_path / "meg"
    assert sorted(p.name for p in meg.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert all(p.stat().st_size > 10_000 for p in meg.glob("*.distcp"))  # both processes wrote chunks
    back = tmp_path / "back"
    assert len(list(back.glob("*.safetensors"))) > 2
    for out in (back, tmp_path / "driver"):
        tensors = _hf_tensors(out)
        for key, tensor in model.state_dict().items():
            if key == "lm_head.weight":
                continue  # tied
            assert torch.equal(tensors[key], tensor), (out.name, key)
    assert not list(tmp_path.glob(".*partial"))
