"""Reading finished sweep runs and reducing them to numbers: curves over seeds, thresholds, spreads.

Pure functions over plain lists/dicts (no plotting, no Markdown), so that each can be checked
against hand-computed values (tests/experiments/test_stats.py).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

REWARD_KEY = "rollout/reward_mean"
ENTROPY_KEY = "train/entropy"


@dataclasses.dataclass
class RunData:
    """One finished (or partly finished) RL run: its per-step records and its final evaluation."""

    method: str
    seed: int
    records: List[dict]
    final_eval: Optional[dict]

    def series(self, key: str) -> Tuple[List[int], List[float]]:
        """(steps, values) of `key` over the run's steps; steps where it is missing or not finite are left out."""
        steps, values = [], []
        for record in self.records:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values


def read_metrics(path: Path) -> List[dict]:
    """metrics.jsonl -> records sorted by step (a line cut by a kill is skipped; later duplicates win)."""
    by_step: Dict[int, dict] = {}
    if not path.is_file():
        return []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def load_run(run_dir: Path, method: str, seed: int) -> RunData:
    final = run_dir / "final_eval.json"
    return RunData(method, seed, read_metrics(run_dir / "metrics.jsonl"),
                   json.loads(final.read_text()) if final.is_file() else None)


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for one value; NaN, NaN for none)."""
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def trailing_mean(values: Sequence[float], window: int) -> List[float]:
    """out[i] = mean(values[i - window + 1 : i + 1]); the first window - 1 entries average what exists."""
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1): i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def steps_to_threshold(steps: Sequence[int], values: Sequence[float], threshold: float, window: int) -> Optional[int]:
    """The first step whose trailing mean over `window` logged steps (a full window) reaches `threshold`; None if never."""
    for i in range(window - 1, len(values)):
        if sum(values[i - window + 1: i + 1]) / window >= threshold:
            return int(steps[i])
    return None


def across_seeds(runs: Sequence[RunData], key: str) -> Tuple[List[int], List[float], List[float], List[int]]:
    """(steps, mean, std, count) of `key` over the runs, step by step (steps any run logged)."""
    per_step: Dict[int, List[float]] = {}
    for run in runs:
        for step, value in zip(*run.series(key), strict=True):
            per_step.setdefault(step, []).append(value)
    steps = sorted(per_step)
    stats = [mean_std(per_step[s]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats], [len(per_step[s]) for s in steps]


def tail_mean(run: RunData, key: str, last: int) -> float:
    """Mean of `key` over the run's last `last` logged steps."""
    _, values = run.series(key)
    values = values[-last:]
    return sum(values) / len(values) if values else math.nan


def run_mean(run: RunData, key: str) -> float:
    """Mean of `key` over all of the run's logged steps."""
    _, values = run.series(key)
    return sum(values) / len(values) if values else math.nan


def eval_key(record: Optional[dict], dataset: str, metric: str) -> Tuple[Optional[str], float]:
    """(`eval/<dataset>/<metric>@k` key, value) from a final/warm-up eval record; metric is avg or pass."""
    if not record:
        return None, math.nan
    prefix = f"eval/{dataset}/{metric}@"
    for key, value in record.items():
        if key.startswith(prefix):  # null: a non-finite value (metrics.jsonl writes NaN as null)
            return key, math.nan if value is None else float(value)
    return None, math.nan


def paired_differences(a: Dict[int, float], b: Dict[int, float]) -> Dict[int, float]:
    """a[seed] - b[seed] for the seeds both have (same seed = same warm-up start and data order)."""
    return {seed: a[seed] - b[seed] for seed in sorted(set(a) & set(b))
            if math.isfinite(a[seed]) and math.isfinite(b[seed])}


def describe_difference(diffs: Dict[int, float]) -> str:
    """'+0.031 (per seed +0.02, +0.05, +0.02; same sign on 3/3 seeds)' -- words, no verdict beyond the signs."""
    if not diffs:
        return "n/a (no seed finished both)"
    values = list(diffs.values())
    mean, _ = mean_std(values)
    positive = sum(v > 0 for v in values)
    negative = sum(v < 0 for v in values)
    if positive == negative == 0:
        sign = f"equal on {len(values)}/{len(values)} seeds"
    elif positive == len(values):
        sign = f"higher on {positive}/{len(values)} seeds"
    elif negative == len(values):
        sign = f"lower on {negative}/{len(values)} seeds"
    else:
        sign = f"mixed: higher on {positive}, lower on {negative} of {len(values)} seeds"
    per_seed = ", ".join(f"{v:+.3f}" for v in values)
    return f"{mean:+.3f} (per seed {per_seed}; {sign})"


def gated_gate_weight(run: RunData) -> float:
    """Mean over steps of the gate weight on gated tokens, 1 - (1 - w_all) / gated_frac, from per-step
    `maspo/gate_weight_mean` (all tokens) and the gated fractions (steps with nothing gated are left out)."""
    weights = dict(zip(*run.series("maspo/gate_weight_mean"), strict=True))
    positive = dict(zip(*run.series("maspo/gated_pos_frac"), strict=True))
    negative = dict(zip(*run.series("maspo/gated_neg_frac"), strict=True))
    values = []
    for step, weight in weights.items():
        gated = positive.get(step, 0.0) + negative.get(step, 0.0)
        if gated > 0:
            values.append(1.0 - (1.0 - weight) / gated)
    return sum(values) / len(values) if values else math.nan
