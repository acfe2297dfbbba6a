"""Rank and rendezvous from the launcher's environment (`parallel/launch_env.py`), the one reader."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from maspo_megatron.parallel.launch_env import RankEnv, rank_env, rendezvous_port, slurm_rendezvous

REPO = Path(__file__).resolve().parents[2]


def test_torchrun_then_srun_then_a_lone_process():
    torchrun = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}
    srun = {"SLURM_PROCID": "6", "SLURM_NTASKS": "16", "SLURM_LOCALID": "2"}
    assert rank_env(torchrun) == RankEnv(5, 8, 1, "torchrun")
    assert rank_env({**srun, **torchrun}) == RankEnv(5, 8, 1, "torchrun")  # torchrun inside an srun step
    assert rank_env(srun) == RankEnv(6, 16, 2, "srun")
    assert rank_env({"RANK": "3", "WORLD_SIZE": "4"}) == RankEnv(3, 4, 3, "torchrun")  # one node: local = global
    assert rank_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4"}) == RankEnv(3, 4, 0, "srun")
    assert rank_env({"WORLD_SIZE": "4"}) == RankEnv(0, 1, 0, None)  # no rank: not launched
    assert rank_env({}) == RankEnv(0, 1, 0, None)


def test_a_variable_that_is_not_an_integer_is_named():
    with pytest.raises(ValueError, match=r"^environment variable WORLD_SIZE='eight': expected an integer$"):
        rank_env({"RANK": "0", "WORLD_SIZE": "eight"})


def test_slurm_rendezvous_fills_only_what_is_missing():
    env = {"SLURM_PROCID": "3", "SLURM_JOB_ID": "12345", "SLURM_RESTART_COUNT": "1", "MASTER_ADDR": "node7"}
    assert slurm_rendezvous(env) == {"MASTER_PORT": "26416"}  # 20000 + (12345 * 7 + 1) % 20000
    assert slurm_rendezvous({**env, "MASTER_PORT": "1234"}) == {}
    assert slurm_rendezvous({**env, "RANK": "3"}) == {}  # torchrun set everything
    with pytest.raises(SystemExit, match="SLURM_JOB_NODELIST is not"):
        slurm_rendezvous({"SLURM_PROCID": "0", "SLURM_JOB_ID": "1"})


@pytest.mark.parametrize("job_id, restarts", [(12345, 0), (12345, 2), (7, 0), (999_999, 5)])
def test_the_sbatch_scripts_derive_the_same_port(job_id, restarts):
    script = (f"source {REPO / 'slurm' / 'common.sh'}; unset MASTER_PORT; SLURM_JOB_ID={job_id}; "
              f"SLURM_RESTART_COUNT={restarts}; maspo_rendezvous host; echo $MASTER_PORT")
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    assert int(shell) == rendezvous_port(job_id, restarts)
