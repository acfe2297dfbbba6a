"""`LaunchConfig`: where and how a training job runs (executor, cluster shape, container, Slurm account).

It is deliberately separate from the training `Config`: the same training config object is
launched unchanged on a laptop (`executor: local`) or a cluster (`executor: slurm`). Loaded like
every other config (YAML + dotted overrides, validated with one-line errors):

    launch = load_config("cluster.yaml", ["nodes=4", "partition=batch"], cls=LaunchConfig)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Literal, Optional

from maspo_megatron.config.fields import option

_TIME_RE = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclasses.dataclass
class LaunchConfig:
    executor: Literal["local", "slurm"] = option("local", help="nemo-run executor")
    device: Literal["gpu", "cpu"] = option("gpu", help="cpu: gloo ranks, no GPUs requested")
    nodes: int = option(1, ge=1)
    gpus_per_node: int = option(8, ge=1, help="ranks per node in gpu mode (one per GPU)")
    tasks_per_node: int = option(1, ge=1, help="ranks per node in cpu mode")
    partition: Optional[str] = None
    account: Optional[str] = option(None, help="Slurm account (required by SlurmExecutor; 'root' when unset)")
    time: str = option("04:00:00", help="Slurm time limit, [D-]HH:MM:SS")
    qos: Optional[str] = None
    container_image: Optional[str] = option(None, help="pyxis/enroot image; unset: run the current python")
    container_mounts: List[str] = option(factory=list, help="pyxis mounts, 'src:dst'")
    python: Optional[str] = option(None, help="python per rank (default: 'python' in a container, else this interpreter)")
    train_module: str = option("maspo_megatron.train", help="module every rank runs")
    preempt_signal_s: int = option(120, ge=0, help="Slurm sends USR1 this long before the time limit (0: off)")
    retries: int = option(3, ge=0, help="requeues after a non-zero exit (75 = checkpoint saved) on Slurm")
    job_dir: Optional[str] = option(None, help="nemo-run experiments home (default $NEMORUN_HOME or ~/.nemo_run)")
    tunnel: Literal["local", "ssh"] = option("local", help="local: submit from a cluster node; ssh: from elsewhere")
    ssh_host: Optional[str] = None
    ssh_user: Optional[str] = None
    remote_job_dir: Optional[str] = option(None, help="job directory on the cluster for the ssh tunnel")
    env: Dict[str, str] = option(factory=dict, help="extra environment for every rank")
    rdzv_port: Optional[int] = option(None, ge=1024, le=65535, help="local torchrun port (default: a free one)")

    def validate(self) -> None:
        if not _TIME_RE.match(self.time):
            raise ValueError(f"time: {self.time!r} is not a Slurm time ([D-]HH:MM:SS, MM or MM:SS)")
        if self.tunnel == "ssh" and not (self.ssh_host and self.remote_job_dir):
            raise ValueError("tunnel: 'ssh' needs ssh_host and remote_job_dir")
        if self.executor == "local" and self.nodes != 1:
            raise ValueError(f"nodes: the local executor runs on one node, got {self.nodes}")
        if self.job_dir and "nemo_run" in self.job_dir.split("/"):
            # nemo-run rewrites paths around its run-dir name "nemo_run" and would mangle the sbatch --output.
            raise ValueError(f"job_dir: {self.job_dir!r} has a path component named 'nemo_run'; nemo-run mangles such paths")
        for mount in self.container_mounts:
            if ":" not in mount:
                raise ValueError(f"container_mounts: {mount!r} is not 'src:dst'")

    @property
    def ranks_per_node(self) -> int:
        return self.gpus_per_node if self.device == "gpu" else self.tasks_per_node

    @property
    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node
