"""nemo-run's SlurmExecutor (LocalTunnel) submits the CPU job to the real test Slurm and sees it succeed.

nemo-run polls `sacct` for the job state, which is why the fixture runs slurmdbd + MariaDB. The
launch goes through the CLI in a subprocess: nemo-run's LocalTunnel reads stdin (invoke), which
pytest's capture forbids in-process.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from tests.slurm.slurm_jobs import CPU_TINY, FAST_REAL_OVERRIDES, REPO, TRAINER_KIND, sacct_state

pytestmark = pytest.mark.slurm


@pytest.mark.parametrize("kind", [TRAINER_KIND])
def test_slurm_executor_job_succeeds(slurm_cluster, tmp_path, kind):
    cmd = [sys.executable, "-m", "maspo_megatron.launch", "--executor", "slurm", "--device", "cpu",
           "--tasks-per-node", "2", "--time", "00:10:00", "--job-dir", str(tmp_path / "nemorun_home"),
           "--name", f"slurm-{kind}", "--set", "retries=0"]
    if kind == "contract":
        config = tmp_path / "contract.yaml"
        config.write_text("trainer:\n  save_every: 0\n")
        cmd += ["--config", str(config), "--set", "train_module=contract_trainer",
                "--set", f"env.PYTHONPATH={REPO / 'tests' / 'slurm'}"]
    else:
        cmd += ["--config", str(CPU_TINY), *FAST_REAL_OVERRIDES]
    cmd += [f"trainer.output_dir={tmp_path / 'run'}", "trainer.total_steps=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, timeout=500,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    match = re.search(r"maspo launch: slurm job (\d+) SUCCEEDED", result.stdout)
    assert match, result.stdout[-2000:]
    assert sacct_state(match.group(1)) == ("COMPLETED", "0:0")
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "run" / "checkpoints" / latest).is_dir()
