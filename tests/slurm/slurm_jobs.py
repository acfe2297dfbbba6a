"""Submitting to and waiting on the test Slurm (tests/slurm/conftest.py starts it)."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_TINY = REPO / "examples" / "cpu_tiny.yaml"
# Jobs run the real `maspo_megatron.train` with the CPU default config; before the RL loop existed
# they ran tests/slurm/contract_trainer.py (still used when the placeholder entry point is back).
REAL_LOOP = CPU_TINY.is_file() and "PLACEHOLDER" not in (REPO / "maspo_megatron" / "train.py").read_text()
TRAINER_KIND = "real" if REAL_LOOP else "contract"
# Keep the CPU default short in tests: no SFT warm-up, small batches, no end-of-run eval/export.
FAST_REAL_OVERRIDES = ("trainer.sft_warmup_steps=0", "trainer.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
                       "trainer.eval_at_end=false", "trainer.hf_export_at_end=false", "trainer.tensorboard=false")


def sacct_state(job_id: str) -> tuple[str, str]:
    """(State, ExitCode) of the whole job from `sacct`, e.g. ("COMPLETED", "0:0")."""
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State,ExitCode"],
                         capture_output=True, text=True, check=True).stdout.strip().splitlines()
    if not out:
        return ("", "")
    state, code = out[-1].split("|")
    return state.split()[0], code


def submit(script: str | Path, *args: str, script_args: tuple = (), env: dict | None = None, cwd: Path = REPO) -> str:
    """`sbatch --parsable ARGS SCRIPT SCRIPT_ARGS` from `cwd`; returns the job id."""
    full_env = {**os.environ, **(env or {})}
    result = subprocess.run(["sbatch", "--parsable", *args, str(script), *script_args], capture_output=True, text=True,
                            env=full_env, cwd=cwd)
    assert result.returncode == 0, f"sbatch failed: {result.stderr.strip()}"
    return result.stdout.strip().split(";")[0]


def wait_job(job_id: str, timeout_s: float, done_states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                        "OUT_OF_MEMORY", "NODE_FAIL")) -> str:
    """Polls `squeue`/`sacct` until the job leaves the queue in a final state; returns that state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if not queued:
            state, _ = sacct_state(job_id)
            if state in done_states:
                return state
        time.sleep(0.5)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish within {timeout_s} s (state {sacct_state(job_id)})")
