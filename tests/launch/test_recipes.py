"""nemo-run recipes: one training config, two executors; launch-config validation; the per-rank entry."""
from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from maspo_megatron.config import ConfigError, load_config, to_dict
from maspo_megatron.launch.cluster import LaunchConfig
from maspo_megatron.launch.recipes import build_job, decode_config

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def train_cfg():
    return load_config(None, ["trainer.total_steps=7", "algorithm.maspo.alpha=0.5", "parallel.tp=2"])


def _payload(script) -> str:
    return script.args[script.args.index("--config-b64") + 1]


def test_local_and_slurm_jobs_carry_the_same_training_config(train_cfg, tmp_path):
    local_script, local_exec = build_job(train_cfg, LaunchConfig(executor="local", device="cpu", tasks_per_node=2))
    slurm_script, slurm_exec = build_job(train_cfg, LaunchConfig(executor="slurm", nodes=2, gpus_per_node=4,
                                                                 job_dir=str(tmp_path)))
    assert _payload(local_script) == _payload(slurm_script)
    decoded = decode_config(_payload(slurm_script))
    assert to_dict(decoded) == to_dict(train_cfg)
    assert decoded.algorithm.maspo.alpha == 0.5 and decoded.trainer.total_steps == 7
    assert local_script.path == slurm_script.path == "maspo_megatron.launch.rank_entry" and local_script.m
    assert type(local_exec).__name__ == "LocalExecutor" and type(slurm_exec).__name__ == "SlurmExecutor"


def test_slurm_executor_shape_container_and_preemption(train_cfg, tmp_path):
    launch = LaunchConfig(executor="slurm", nodes=4, gpus_per_node=8, partition="batch", account="proj",
                          time="02:30:00", container_image="nvcr.io/nvidia/pytorch:25.04-py3",
                          container_mounts=["/lustre:/lustre"], preempt_signal_s=90, retries=5, job_dir=str(tmp_path))
    script, ex = build_job(train_cfg, launch)
    assert (ex.nodes, ex.ntasks_per_node, ex.gpus_per_node) == (4, 8, 8)
    assert (ex.partition, ex.account, ex.time) == ("batch", "proj", "02:30:00")
    assert ex.container_image == "nvcr.io/nvidia/pytorch:25.04-py3" and ex.container_mounts == ["/lustre:/lustre"]
    assert ex.signal == "USR1@90" and ex.retries == 5
    assert script.entrypoint == "python"  # the container's python, not this machine's venv
    assert ex.tunnel.job_dir == str(tmp_path / "experiments")  # LocalTunnel copies nothing


def test_cpu_variant_requests_no_gpus(train_cfg, tmp_path):
    _, ex = build_job(train_cfg, LaunchConfig(executor="slurm", device="cpu", tasks_per_node=2, job_dir=str(tmp_path)))
    assert ex.gpus_per_node is None and ex.ntasks_per_node == 2
    assert ex.env_vars["CUDA_VISIBLE_DEVICES"] == "" and ex.env_vars["OMP_NUM_THREADS"]
    _, local = build_job(train_cfg, LaunchConfig(executor="local", device="cpu", tasks_per_node=1))
    assert local.launcher is None  # one rank runs directly; several go through torchrun


@pytest.mark.parametrize("override, key", [
    ("time=two hours", "time"),
    ("nodes=0", "nodes"),
    ("executor=k8s", "executor"),
    ("tunnel=ssh", "tunnel"),
    ("container_mounts=[/data]", "container_mounts"),
    ("gpus_per_nodes=8", "gpus_per_nodes"),
    ("job_dir=/scratch/nemo_run/jobs", "job_dir"),
])
def test_bad_launch_settings_are_one_line_errors_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override], cls=LaunchConfig)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message, message


def test_local_executor_refuses_several_nodes():
    with pytest.raises(ConfigError, match="^nodes: the local executor runs on one node"):
        load_config(None, ["nodes=2"], cls=LaunchConfig)


def test_rank_entry_runs_the_module_with_the_config_and_keeps_its_exit_code(tmp_path):
    module = tmp_path / "fake_train_mod.py"
    module.write_text(
        "import sys, pathlib\n"
        "args = sys.argv[1:]\n"
        "assert args[0] == '--config', args\n"
        "pathlib.Path(sys.argv[0]).with_name('seen.yaml').write_text(pathlib.Path(args[1]).read_text())\n"
        "pathlib.Path(sys.argv[0]).with_name('extra.txt').write_text(' '.join(args[2:]))\n"
        "sys.exit(75)\n")
    payload = base64.b64encode(yaml.safe_dump({"trainer": {"total_steps": 4}}).encode()).decode()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    result = subprocess.run([sys.executable, "-m", "maspo_megatron.launch.rank_entry", "--module", "fake_train_mod",
                             "--config-b64", payload, "trainer.seed=3"], env=env, capture_output=True, text=True)
    assert result.returncode == 75, result.stderr
    assert yaml.safe_load((tmp_path / "seen.yaml").read_text()) == {"trainer": {"total_steps": 4}}
    assert (tmp_path / "extra.txt").read_text() == "trainer.seed=3"


def test_cli_rejects_bad_launch_setting_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "maspo_megatron.launch", "--config", str(tmp_path / "none.yaml")],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "none.yaml: config file not found" in result.stderr
    config = tmp_path / "c.yaml"
    config.write_text("trainer:\n  total_steps: 2\n")
    result = subprocess.run([sys.executable, "-m", "maspo_megatron.launch", "--config", str(config), "--time", "soon"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("maspo launch: config error: time:"), result.stderr
