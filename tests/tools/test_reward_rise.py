"""tools/reward_rise.py reads a metrics.jsonl with a null reward (how the trainer writes a non-finite metric)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_null_reward_is_read_as_missing(tmp_path):
    rewards = [0.1, 0.2, None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # step 3's mean was NaN: written as null
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": step, "rollout/reward_mean": value}) + "\n"
                            for step, value in enumerate(rewards, start=1)))
    done = subprocess.run([sys.executable, str(REPO / "tools" / "reward_rise.py"), str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    # 10 finite rewards: fifths of 2 steps, (0.1 + 0.2) / 2 and (0.9 + 1.0) / 2
    assert "10 steps; mean reward first fifth 0.150, last fifth 0.950" in done.stdout
