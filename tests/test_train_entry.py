"""The entry point as launchers use it: `python -m maspo_megatron.train --config FILE overrides...`.

- resume exactness: 4 steps straight == 2 steps, process SIGKILLed, resumed, SIGTERM after
  step 3 (the step finishes, a checkpoint is written, exit code 75), resumed again to step 4:
  identical metrics apart from timings, bit-identical final weights.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from maspo_megatron.utils.ports import free_port
from tests.helpers.loop_cases import EXAMPLE, tiny_overrides

REPO = Path(__file__).resolve().parents[1]


def _start(output_dir: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()))
    args = tiny_overrides(str(output_dir), "trainer.total_steps=4", "trainer.save_every=2",
                          "trainer.eval_at_end=false", *extra)
    log = open(output_dir.parent / f"{output_dir.name}.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "maspo_megatron.train", "--config", EXAMPLE, *args],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout_s: float = 240) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # also the dist-checkpoint Manager it may have left
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_for(predicate, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (code {proc.returncode}) before the awaited state")
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


def _metrics(output_dir: Path) -> list[dict]:
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records]


def _latest(output_dir: Path) -> str:
    pointer = output_dir / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else ""


def test_resume_after_kill_and_sigterm_is_exact(tmp_path):
    """4 steps straight == 2 steps + SIGKILL, resume, SIGTERM after step 3 (checkpoint, exit 75), resume."""
    straight = tmp_path / "straight"
    assert _finish(_start(straight)) == 0
    resumed = tmp_path / "resumed"
    proc = _start(resumed)
    try:
        _wait_for(lambda: _latest(resumed) == "step_2", proc)
    finally:
        _kill_group(proc)  # SIGKILL: no chance to save anything more
    proc = _start(resumed)
    try:
        _wait_for(lambda: len(_metrics(resumed)) >= 3, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
    finally:
        _kill_group(proc)
    assert code == 75
    stopped_at = len(_metrics(resumed))
    assert stopped_at >= 3 and _latest(resumed) == f"step_{stopped_at}"
    assert _finish(_start(resumed)) == 0
    expected, got = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert got == expected
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
