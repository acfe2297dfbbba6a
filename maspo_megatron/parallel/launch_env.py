"""Rank and rendezvous from the launcher's environment: the one place that reads it.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT); srun sets
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and no rendezvous, which the sbatch scripts
(slurm/common.sh `maspo_rendezvous`) or `slurm_rendezvous` below fill in. Neither: one process.

    env = rank_env()                  # RankEnv(rank=0, world_size=1, local_rank=0, launcher=None)
    os.environ.update(slurm_rendezvous(dict(os.environ)))
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Mapping, Optional

_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_SRUN = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class RankEnv:
    """This process's place in the job. launcher: "torchrun", "srun", or None (a lone process)."""

    rank: int
    world_size: int
    local_rank: int
    launcher: Optional[str]


def rank_env(environ: Optional[Mapping[str, str]] = None) -> RankEnv:
    """(rank, world size, local rank) from torchrun's variables, else srun's, else a single process.

    A variable that is set but not an integer is an error naming it.
    """
    environ = os.environ if environ is None else environ
    for launcher, (rank_key, world_key, local_key) in (("torchrun", _TORCHRUN), ("srun", _SRUN)):
        if rank_key in environ and world_key in environ:
            rank, world = _int(environ, rank_key), _int(environ, world_key)
            local = _int(environ, local_key) if local_key in environ else (rank if launcher == "torchrun" else 0)
            return RankEnv(rank, world, local, launcher)
    return RankEnv(0, 1, 0, None)


def rendezvous_port(job_id: int, restarts: int = 0) -> int:
    """The MASTER_PORT of a Slurm job (slurm/common.sh computes the same): distinct per job and per
    restart of a requeued job, so jobs sharing a node, or a requeue whose old socket lingers in
    TIME_WAIT, do not collide."""
    return 20000 + (job_id * 7 + restarts) % 20000


def slurm_rendezvous(environ: Mapping[str, str]) -> dict:
    """MASTER_ADDR/MASTER_PORT for an srun task when the launcher left them unset; {} otherwise.

    MASTER_ADDR is the allocation's first host (`scontrol show hostnames`).
    """
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return {}
    found = {}
    if not environ.get("MASTER_ADDR"):
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise SystemExit("slurm_rendezvous: SLURM_PROCID is set but SLURM_JOB_NODELIST is not")
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               check=True).stdout.split()
        found["MASTER_ADDR"] = hosts[0]
    if not environ.get("MASTER_PORT"):
        found["MASTER_PORT"] = str(rendezvous_port(_int(environ, "SLURM_JOB_ID", "0"),
                                                   _int(environ, "SLURM_RESTART_COUNT", "0")))
    return found


def _int(environ: Mapping[str, str], key: str, default: Optional[str] = None) -> int:
    value = environ.get(key, default)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {key}={value!r}: expected an integer") from None
