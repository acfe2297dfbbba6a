"""The sweep machinery end to end on real processes: 1 method x 1 seed, a 1-step warm-up and 2 RL
steps, then the report; a second call reruns nothing."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY = ["trainer.sft_warmup_steps=1", "trainer.total_steps=2", "trainer.prompts_per_step=4",
        "rollout.n_samples_per_prompt=2", "trainer.eval_n_samples=2", "trainer.eval_max_prompts=4",
        "data.synthetic.max_operand=9"]


def _run(tmp_path, *extra):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text((REPO / "examples" / "experiments" / "sweep.yaml").read_text()
                     .replace("base: base.yaml", f"base: {REPO / 'examples' / 'experiments' / 'base.yaml'}")
                     .replace("num_prompts: 64", "num_prompts: 8"))
    argv = [sys.executable, str(REPO / "tools" / "run_experiments.py"), "--sweep", str(sweep),
            "--out", str(tmp_path / "out"), "--methods", "maspo", "--seeds", "1", "--set", *TINY,
            "--report", str(tmp_path / "docs" / "experiments.md"), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)


def test_one_method_one_seed_then_report_then_nothing_reruns(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    out = tmp_path / "out"
    run_dir = out / "runs" / "maspo" / "seed1"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all("maspo/gated_pos_frac" in r and "train/entropy" in r for r in records)
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert set(final) >= {"eval/heldout/avg@2", "eval/heldout/pass@2"}
    # the RL run started from the warm-up's weights, not from a warm-up of its own
    log = (run_dir / "log.txt").read_text()
    assert "sft warm-up" not in log
    assert "sft warm-up 1/1" in (out / "warmup" / "seed1" / "log.txt").read_text()

    report = (tmp_path / "docs" / "experiments.md").read_text()
    figures = tmp_path / "docs" / "experiments"
    for name in ("reward_vs_step.png", "entropy_vs_step.png", "maspo_stats.png"):
        assert (figures / name).read_bytes()[:8] == PNG_MAGIC
        assert f"(experiments/{name})" in report
    assert "Runs finished: 1/24" in report
    rows = list(csv.DictReader(open(figures / "runs.csv")))
    assert [(r["method"], r["seed"], r["steps"]) for r in rows] == [("maspo", "1", "2")]
    assert float(rows[0]["heldout_avg"]) == final["eval/heldout/avg@2"]
    maspo_row = next(line for line in report.splitlines() if line.startswith("| MASPO |"))
    assert f"{final['eval/heldout/avg@2']:.3f} ± 0.000" in maspo_row
    held = {json.loads(line)["question"] for line in (out / "heldout.jsonl").read_text().splitlines()}
    train = {json.loads(line)["question"] for line in (out / "train.jsonl").read_text().splitlines()}
    assert len(held) == 8 and not held & train

    marker = run_dir / "final_eval.json"
    stamp = marker.stat().st_mtime_ns
    second = _run(tmp_path, "--no-report")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "2 job(s) already finished: not rerun" in second.stdout
    assert marker.stat().st_mtime_ns == stamp
