"""nemo-run's LocalExecutor runs the CPU job end to end through `python -m maspo_megatron.launch`
(2 gloo ranks under torchrun): the real `maspo_megatron.train` with examples/cpu_tiny.yaml, or
tests/slurm/contract_trainer.py while train.py is the placeholder."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CPU_TINY = REPO / "examples" / "cpu_tiny.yaml"
REAL_LOOP = CPU_TINY.is_file() and "PLACEHOLDER" not in (REPO / "maspo_megatron" / "train.py").read_text()
FAST_REAL_OVERRIDES = ["trainer.sft_warmup_steps=0", "trainer.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
                       "trainer.eval_at_end=false", "trainer.hf_export_at_end=false", "trainer.tensorboard=false"]


def test_local_executor_cpu_job_succeeds(tmp_path):
    cmd = [sys.executable, "-m", "maspo_megatron.launch", "--executor", "local", "--device", "cpu",
           "--tasks-per-node", "2", "--job-dir", str(tmp_path / "nemorun_home"), "--name", "cpu-local"]
    if REAL_LOOP:
        cmd += ["--config", str(CPU_TINY), *FAST_REAL_OVERRIDES]
    else:
        config = tmp_path / "contract.yaml"
        config.write_text("trainer:\n  save_every: 0\n")
        cmd += ["--config", str(config), "--set", "train_module=contract_trainer",
                "--set", f"env.PYTHONPATH={REPO / 'tests' / 'slurm'}"]
    cmd += [f"trainer.output_dir={tmp_path / 'run'}", "trainer.total_steps=3"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL, timeout=500,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "maspo launch: local job" in result.stdout and "SUCCEEDED" in result.stdout
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    if not REAL_LOOP:
        assert {m["world_size"] for m in metrics} == {2} and {m["allreduce"] for m in metrics} == {3.0}
    latest = (tmp_path / "run" / "checkpoints" / "latest").read_text().strip()
    assert latest == "step_3" and (tmp_path / "run" / "checkpoints" / latest).is_dir()
