"""The reward rise of a run: mean `rollout/reward_mean` over the first and the last fifth of its steps.

    python tools/reward_rise.py outputs/cpu_tiny/metrics.jsonl
    python tools/reward_rise.py --run [--config examples/cpu_tiny.yaml] [--output-dir DIR] [override ...]

With --run it first trains (`python -m maspo_megatron.train`, fresh output dir) and then reads the
run's metrics. Prints one line per fifth, the final evaluation if there is one, and the device
the run reported. Exit 0 when the last fifth's mean reward is above the first fifth's, 1 when it
is not, 2 when the run failed or the metrics are missing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def fifths(metrics_path: Path) -> tuple[float, float, int]:
    """(mean reward of the first fifth, of the last fifth, step count) from a metrics.jsonl."""
    rewards = []
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        if record.get("rollout/reward_mean") is not None:  # null: a non-finite mean, read as missing
            rewards.append(float(record["rollout/reward_mean"]))
    if len(rewards) < 5:
        raise ValueError(f"{metrics_path}: {len(rewards)} steps with rollout/reward_mean; need at least 5")
    fifth = len(rewards) // 5
    return sum(rewards[:fifth]) / fifth, sum(rewards[-fifth:]) / fifth, len(rewards)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="?", help="metrics.jsonl of a finished run")
    parser.add_argument("--run", action="store_true", help="train first (fresh output dir)")
    parser.add_argument("--config", default=str(REPO / "examples/cpu_tiny.yaml"))
    parser.add_argument("--output-dir", default="outputs/reward_rise")
    parser.add_argument("overrides", nargs="*", default=[])
    args = parser.parse_args(argv)
    if args.run:
        out = Path(args.output_dir)
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "maspo_megatron.train", "--config", args.config,
                   f"trainer.output_dir={out}", *args.overrides]
        print("reward_rise: " + " ".join(command), flush=True)
        if subprocess.call(command, cwd=REPO) != 0:
            print("reward_rise: the run failed", file=sys.stderr)
            return 2
        metrics = out / "metrics.jsonl"
    elif args.metrics:
        metrics = Path(args.metrics)
    else:
        parser.error("give a metrics.jsonl or --run")
    try:
        first, last, steps = fifths(metrics)
    except (OSError, ValueError) as exc:
        print(f"reward_rise: {exc}", file=sys.stderr)
        return 2
    print(f"reward_rise: {steps} steps; mean reward first fifth {first:.3f}, last fifth {last:.3f}")
    final = metrics.with_name("final_eval.json")
    if final.exists():
        print("reward_rise: final evaluation " + final.read_text().replace("\n", " "))
    return 0 if last > first else 1


if __name__ == "__main__":
    sys.exit(main())
