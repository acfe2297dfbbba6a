"""metrics.jsonl (strict JSON per step, cut back on resume), summary line, signal flag."""
import io
import json
import os
import signal

from maspo_megatron.trainer.metrics import MetricsLogger, format_summary, write_json_atomically
from maspo_megatron.trainer.signals import EXIT_CODE_REQUEUE, StopRequest


def _strict_json(line: str):
    """json.loads refusing the non-standard NaN / Infinity / -Infinity tokens Python writes by default."""
    def refuse(token):
        raise ValueError(f"non-standard JSON constant {token} in {line!r}")

    return json.loads(line, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(tmp_path):
    """NaN and +-inf (Python floats, 0-dim tensors) become JSON null: strict JSON, no strings among the numbers."""
    import torch

    log = MetricsLogger(tmp_path, 2, tensorboard=False, stream=io.StringIO())
    log.log(1, {"rollout/reward_mean": 0.5, "maspo/gate_weight_mean_gated": float("nan"),
                "train/grad_norm": float("inf"), "train/loss": float("-inf"), "train/entropy": torch.tensor(float("nan")),
                "train/lr": torch.tensor(0.25), "rollout/dropped_groups": 3})
    log.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "nan" not in line.lower() and "infinity" not in line.lower()
    assert _strict_json(line) == {"step": 1, "rollout/reward_mean": 0.5, "maspo/gate_weight_mean_gated": None,
                                  "train/grad_norm": None, "train/loss": None, "train/entropy": None,
                                  "train/lr": 0.25, "rollout/dropped_groups": 3}


def test_final_eval_file_is_strict_json_written_whole(tmp_path):
    """final_eval.json (the sweep runner's "run done" marker) goes through the same NaN -> null rule, and
    is renamed into place: no temporary file is left, and a reader finds the old file or the new one."""
    import torch

    path = tmp_path / "final_eval.json"
    path.write_text("{}")
    write_json_atomically(path, {"step": 3, "eval/x/avg@4": torch.tensor(float("nan")), "eval/x/pass@4": 0.5})
    assert _strict_json(path.read_text()) == {"step": 3, "eval/x/avg@4": None, "eval/x/pass@4": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final_eval.json"]


def test_jsonl_lines_and_resume_truncation(tmp_path):
    stream = io.StringIO()
    log = MetricsLogger(tmp_path, 5, tensorboard=True, stream=stream)
    for step in (1, 2, 3):
        log.log(step, {"rollout/reward_mean": step / 10, "train/grad_norm": float("nan")})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [_strict_json(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[1]["rollout/reward_mean"] == 0.2 and records[0]["train/grad_norm"] is None
    assert "step 3/5" in stream.getvalue() and "reward 0.300" in stream.getvalue()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    # A run resumed from step 2 must not keep step 3 (logged after the checkpoint it resumes from).
    with (tmp_path / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 4, "rollout/rew')  # a line cut by a kill
    MetricsLogger(tmp_path, 5, tensorboard=False, resume_step=2, stream=io.StringIO()).close()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", 3, enabled=False)
    log.log(1, {"rollout/reward_mean": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()


def test_summary_reports_skipped_steps():
    line = format_summary(2, 4, {"rollout/reward_mean": 0.5, "train/skipped_steps": 1})
    assert line.startswith("step 2/4 [##########") and "SKIPPED 1" in line


def test_stop_request_records_sigusr1_and_sigterm():
    assert EXIT_CODE_REQUEUE == 75
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        stop = StopRequest()
        try:
            assert not stop.should_stop()
            os.kill(os.getpid(), sig)
            assert stop.should_stop() and stop.signal_name == signal.Signals(sig).name
        finally:
            stop.close()
