"""nemo-run recipes: ONE training job (a `Config`) built for nemo-run's LocalExecutor or SlurmExecutor.

    cfg = load_config("examples/cpu_tiny.yaml", ["trainer.total_steps=3"])
    launch = LaunchConfig(executor="slurm", nodes=2, gpus_per_node=8, partition="batch", account="proj")
    result = launch_job(cfg, launch, name="maspo-7b")       # {"state": "SUCCEEDED", "job_id": ..., ...}

The `run.Script` is identical for both executors: `python -m maspo_megatron.launch.rank_entry` with
the config embedded (see rank_entry.py). Only the executor differs: locally one rank runs
directly and several run under torchrun; on Slurm, srun starts one task per GPU (or CPU rank),
`--signal=USR1@<preempt_signal_s>` makes the trainer checkpoint and exit 75, and nemo-run's own
batch script requeues a failed job up to `retries` times, which then resumes from `latest`.
"""
from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from maspo_megatron.config import from_dict, to_dict
from maspo_megatron.config.schema import Config
from maspo_megatron.launch.cluster import LaunchConfig
from maspo_megatron.utils.ports import free_port

RANK_ENTRY_MODULE = "maspo_megatron.launch.rank_entry"
# What nemo-run reports for a job that ended well (torchx AppState names).
SUCCESS_STATES = ("SUCCEEDED",)


def encode_config(cfg: Config) -> str:
    """The validated config as base64 YAML (shell-safe: only [A-Za-z0-9+/=])."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    return base64.b64encode(text.encode()).decode()


def decode_config(payload: str) -> Config:
    """Inverse of `encode_config` (validates again)."""
    return from_dict(Config, yaml.safe_load(base64.b64decode(payload).decode()))


def _rank_env(launch: LaunchConfig) -> dict[str, str]:
    env = {"PYTHONUNBUFFERED": "1"}
    if launch.device == "cpu":
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.update(launch.env)
    if launch.tunnel == "ssh" and launch.executor == "slurm":
        env["PYTHONPATH"] = "/nemo_run/code"  # where nemo-run unpacks the GitArchivePackager archive
    elif not launch.container_image:
        # The checkout may not be pip-installed: put it on the ranks' path (a container brings its own).
        repo_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, launch.env.get("PYTHONPATH")) if p)
    return env


def training_script(cfg: Config, launch: LaunchConfig) -> Any:
    """The `run.Script` every rank runs; the same for every executor."""
    import nemo_run as run

    python = launch.python or ("python" if launch.container_image else sys.executable)
    args = ["--module", launch.train_module, "--config-b64", encode_config(cfg)]
    return run.Script(path=RANK_ENTRY_MODULE, m=True, entrypoint=python, args=args, env=_rank_env(launch))


def local_executor(launch: LaunchConfig) -> Any:
    """One rank: run directly. Several: torchrun on a free port (sets RANK/WORLD_SIZE/MASTER_*)."""
    import nemo_run as run

    ranks = launch.ranks_per_node
    env = _rank_env(launch)
    launcher = None
    if ranks > 1:
        launcher = run.Torchrun(rdzv_port=launch.rdzv_port or free_port())
        # torchx calls `torchrun` by name: the one next to this interpreter (a venv's bin is often not on PATH).
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    else:
        # A single rank still builds a (1-process) process group: give it a free port, not 29500.
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch.rdzv_port or free_port()))
    return run.LocalExecutor(ntasks_per_node=ranks, nodes=1, launcher=launcher, env_vars=env)


def _tunnel(launch: LaunchConfig, experiments_dir: Path) -> Any:
    import nemo_run as run

    if launch.tunnel == "ssh":
        return run.SSHTunnel(host=launch.ssh_host, user=launch.ssh_user or os.environ.get("USER", ""),
                             job_dir=launch.remote_job_dir)
    # LocalTunnel copies nothing: its job_dir must be the experiments dir nemo-run writes the
    # sbatch script into, or sbatch cannot open it.
    return run.LocalTunnel(job_dir=str(experiments_dir))


def slurm_executor(launch: LaunchConfig, experiments_dir: Optional[Path] = None) -> Any:
    """srun with one task per GPU (gpu) or per CPU rank (cpu); container through pyxis when set."""
    import nemo_run as run

    experiments_dir = Path(experiments_dir or nemorun_home(launch)) / "experiments"
    kwargs: dict[str, Any] = dict(
        account=launch.account,  # None: no --account line (the cluster's default account)
        job_name_prefix="maspo-",  # nemo-run would otherwise derive a prefix from the account
        partition=launch.partition,
        qos=launch.qos,
        time=launch.time,
        nodes=launch.nodes,
        ntasks_per_node=launch.ranks_per_node,
        container_image=launch.container_image,
        container_mounts=list(launch.container_mounts),
        env_vars=_rank_env(launch),
        retries=launch.retries,
        tunnel=_tunnel(launch, experiments_dir),
        # Local tunnel: the checkout is on the cluster's shared filesystem, ship nothing. SSH: nemo-run
        # archives the git HEAD and unpacks it next to the job (inside the container at /nemo_run/code).
        packager=run.GitArchivePackager() if launch.tunnel == "ssh" else run.Packager(),
    )
    if launch.device == "gpu":
        kwargs["gpus_per_node"] = launch.gpus_per_node
    if launch.preempt_signal_s:
        kwargs["signal"] = f"USR1@{launch.preempt_signal_s}"
    return run.SlurmExecutor(**kwargs)


def nemorun_home(launch: LaunchConfig) -> str:
    from nemo_run.config import get_nemorun_home

    return launch.job_dir or get_nemorun_home()


def build_job(cfg: Config, launch: LaunchConfig) -> tuple[Any, Any]:
    """(script, executor) for `launch.executor`."""
    script = training_script(cfg, launch)
    if launch.executor == "local":
        return script, local_executor(launch)
    return script, slurm_executor(launch)


def launch_job(cfg: Config, launch: LaunchConfig, name: str = "maspo", wait: bool = True,
               dryrun: bool = False) -> dict:
    """Runs (or, with `dryrun`, only prints) the job; returns {"state", "job_id", "job_dir", "experiment"}.

    With `wait`, blocks until the job ends (nemo-run polls `sacct` on Slurm). `state` is nemo-run's
    name for the final state, e.g. "SUCCEEDED" or "FAILED".
    """
    import nemo_run as run

    script, executor = build_job(cfg, launch)
    with run.Experiment(name, base_dir=nemorun_home(launch), log_level="WARN",
                        enable_goodbye_message=False) as experiment:
        experiment.add(script, executor=executor, name=name, tail_logs=False)
        if dryrun:
            experiment.dryrun(log=True)
            return {"state": "DRYRUN", "job_id": "", "job_dir": "", "experiment": experiment._id}
        experiment.run(detach=not wait, tail_logs=False)
    # Leaving the `with` block is where nemo-run waits for the job (unless detached) and records its
    # final state on the job; a fresh status() query can lag behind that for local jobs.
    job = experiment.jobs[0]
    state = job.state
    _, _, path = (job.handle or "").partition("://")
    parts = path.split("/")
    return {"state": getattr(state, "name", str(state)), "job_id": parts[1] if len(parts) > 1 else "",
            "job_dir": job.executor.job_dir, "experiment": experiment._id}
