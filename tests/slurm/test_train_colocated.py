"""slurm/train_colocated.sbatch under the real slurmctld, CPU variant (gloo, 2 ranks).

Jobs run the real `python -m maspo_megatron.train` with examples/cpu_tiny.yaml (short overrides);
tests/slurm/contract_trainer.py stands in only while train.py is the placeholder.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.slurm.slurm_jobs import CPU_TINY, FAST_REAL_OVERRIDES, REPO, TRAINER_KIND, sacct_state, submit, wait_job

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "slurm" / "train_colocated.sbatch"
HERE = Path(__file__).resolve().parent
KINDS = [TRAINER_KIND]


def _job_env(kind: str, tmp_path: Path, step_s: float) -> tuple[dict, Path]:
    env = {"MASPO_DEVICE": "cpu", "MASPO_REPO": str(REPO), "MASPO_LOG_DIR": str(tmp_path / "logs"),
           "MASPO_OUTPUT_DIR": str(tmp_path / "run"), "OMP_NUM_THREADS": "1"}
    if kind == "contract":
        config = tmp_path / "contract.yaml"
        config.write_text("trainer:\n  total_steps: 3\n")
        env.update(MASPO_CONFIG=str(config), MASPO_TRAIN_MODULE="contract_trainer", PYTHONPATH=str(HERE),
                   CONTRACT_STEP_S=str(step_s))
    else:
        env.update(MASPO_CONFIG=str(CPU_TINY))
    return env, tmp_path / "run"


def _args(kind: str, *overrides: str) -> tuple:
    return (*(FAST_REAL_OVERRIDES if kind == "real" else ()), *overrides)


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _job_log(tmp_path: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(tmp_path.glob("*.out")) + sorted((tmp_path / "logs").glob("*")))


@pytest.mark.parametrize("kind", KINDS)
def test_colocated_cpu_job_runs_to_completion_with_checkpoint(slurm_cluster, tmp_path, kind):
    env, run_dir = _job_env(kind, tmp_path, step_s=0.0)
    job = submit(SCRIPT, "-N", "1", "--ntasks-per-node=2", "--time=10", f"--output={tmp_path}/%x-%j.out",
                 script_args=_args(kind, "trainer.total_steps=3", "trainer.save_every=2"), env=env)
    state = wait_job(job, timeout_s=300)
    assert state == "COMPLETED", f"job {job}: {sacct_state(job)}\n{_job_log(tmp_path)}"
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == [1, 2, 3], _job_log(tmp_path)
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_3"
    assert (run_dir / "checkpoints" / latest).is_dir()
    # one log per job step, named after job, restart and step
    assert [p.name for p in (tmp_path / "logs").iterdir()] == [f"maspo-colocated-{job}-r0-train.log"]
    if kind == "contract":
        assert {m["allreduce"] for m in _metrics(run_dir)} == {3.0}  # 1 + 2 over the two gloo ranks


@pytest.mark.parametrize("kind", KINDS)
def test_usr1_saves_requeues_and_resumes(slurm_cluster, tmp_path, kind):
    total = 12 if kind == "contract" else 6
    env, run_dir = _job_env(kind, tmp_path, step_s=0.5)
    job = submit(SCRIPT, "-N", "1", "--ntasks-per-node=2", "--time=15", f"--output={tmp_path}/%x-%j.out",
                 script_args=_args(kind, f"trainer.total_steps={total}", "trainer.save_every=0"), env=env)
    deadline = time.monotonic() + 240
    while len(_metrics(run_dir)) < 2:  # mid-run: at least two steps done, far from the end
        assert time.monotonic() < deadline, f"no progress\n{_job_log(tmp_path)}"
        assert sacct_state(job)[0] in ("PENDING", "RUNNING", ""), _job_log(tmp_path)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    state = wait_job(job, timeout_s=300)
    log = _job_log(tmp_path)
    assert state == "COMPLETED", f"job {job}: {sacct_state(job)}\n{log}"
    assert (tmp_path / "logs" / f"{job}.preempted").is_file(), log
    restart_count = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "Restarts=1" in restart_count, restart_count
    metrics = _metrics(run_dir)
    steps = [m["step"] for m in metrics]
    # Resumed from the checkpoint written at the signal: every step exactly once, in order.
    assert steps == list(range(1, total + 1)), log
    if kind == "contract":  # the second incarnation began after the signalled step, not at step 1
        first_resumed = next(m["step"] for m in metrics if m["restart"] == 1)
        assert 2 < first_resumed <= total, metrics
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{total}"
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.log"))
    assert logs == [f"maspo-colocated-{job}-r0-train.log", f"maspo-colocated-{job}-r1-train.log"], logs
