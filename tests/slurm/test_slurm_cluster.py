"""The test Slurm itself: it comes up, and `srun -n 2` ranks rendezvous and all-reduce over gloo."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slurm


def test_node_is_idle_and_accounting_answers(slurm_cluster):
    print(f"Slurm fixture start-up: {slurm_cluster['startup_s']:.1f} s (0 = reused a running cluster)")
    state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, check=True).stdout
    assert state.split()[0] in ("idle", "mix", "alloc"), state
    subprocess.run(["sacct", "-n", "-X"], check=True, capture_output=True)


def test_srun_two_tasks_gloo_allreduce(slurm_cluster, tmp_path):
    """Two srun tasks find each other through the allocation's first host, as the sbatch scripts do."""
    script = tmp_path / "allreduce.py"
    script.write_text(textwrap.dedent("""
        import os, subprocess, torch, torch.distributed as dist
        host = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                              capture_output=True, text=True, check=True).stdout.split()[0]
        rank, world = int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"])
        port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
        dist.init_process_group("gloo", init_method=f"tcp://{host}:{port}", rank=rank, world_size=world)
        value = torch.tensor([float(rank + 1)])
        dist.all_reduce(value)
        print(f"rank {rank}/{world} sum {value.item()}")
        dist.destroy_process_group()
    """))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["srun", "-n", "2", "--time=2", sys.executable, str(script)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert lines == ["rank 0/2 sum 3.0", "rank 1/2 sum 3.0"], result.stdout
