"""Every example config loads and validates, names a model whose shape ships with it, and fits the
cluster its header says it is for (the header's own `python -m maspo_megatron plan` line)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from maspo_megatron.__main__ import SHAPES_DIR, main
from maspo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml"))
CLUSTER_EXAMPLES = [p for p in EXAMPLES if p.name != "cpu_tiny.yaml"]
# The official MASPO defaults (../shared/MASPO.md), which the paper-model examples must keep.
MASPO_DEFAULTS = {"sigma_base": 1.0, "alpha": 0.3, "sigma_high": 10.0, "adv_low": 0.1, "adv_high": 10.0,
                  "beta_pos": 0.03, "beta_neg": 0.03}


def test_the_six_cluster_examples_exist():
    names = {p.name for p in CLUSTER_EXAMPLES}
    assert {"qwen2.5_1.5b.yaml", "qwen2.5_7b.yaml", "deepseek_r1_distill_qwen_7b.yaml",
            "deepseek_r1_distill_qwen_14b.yaml", "qwen3_8b.yaml", "llama3.3_70b_fp8.yaml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_loads_and_validates(path):
    cfg = load_config(path)
    assert cfg.algorithm.loss == "maspo"


@pytest.mark.parametrize("path", CLUSTER_EXAMPLES, ids=lambda p: p.name)
def test_cluster_example_has_a_shape_file_and_fits_its_documented_cluster(path, capsys):
    cfg = load_config(path)
    assert cfg.model.dtype == "bf16" and cfg.rollout.engine == "sglang"
    assert (SHAPES_DIR / f"{Path(cfg.model.hf_config).name.lower()}.json").is_file()
    header = re.search(r"python -m maspo_megatron plan (.+)", path.read_text())
    assert header, f"{path.name}: no plan command in the header"
    argv = shlex.split(header.group(1))
    assert argv[argv.index("--config") + 1] == f"examples/{path.name}"
    argv[argv.index("--config") + 1] = str(path)
    assert main(["plan", *argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    for row in ("weights", "grads", "optimizer state", "activations", "KV cache", "fits: peak"):
        assert row in out, out
    # the memory note in the header is the planner's current output, not a stale figure
    total = re.search(r"^  total\s+([\d.]+)", out, re.M).group(1)
    assert f"= {total} GiB training" in path.read_text(), f"{path.name}: stale memory note (now {total} GiB)"


@pytest.mark.parametrize("name", ["deepseek_r1_distill_qwen_7b.yaml", "deepseek_r1_distill_qwen_14b.yaml"])
def test_paper_examples_keep_the_official_maspo_hyperparameters(name):
    cfg = load_config(REPO / "examples" / name)
    maspo = cfg.algorithm.maspo
    assert {k: getattr(maspo, k) for k in MASPO_DEFAULTS} == MASPO_DEFAULTS
    assert cfg.algorithm.kl_coef == 0.0 and cfg.algorithm.entropy_coef == 0.0
    assert cfg.algorithm.mini_batches > 1  # otherwise r == 1 and the gate never acts
    assert cfg.trainer.eval_n_samples == 32  # Avg@32 as the paper reports


def test_llama_70b_example_trains_and_rolls_out_in_fp8():
    cfg = load_config(REPO / "examples" / "llama3.3_70b_fp8.yaml")
    assert cfg.model.fp8 == "blockwise"
    assert cfg.rollout.sglang.quantization == "fp8" and cfg.rollout.weight_sync.fp8
