"""The fast mechanism check (issue 18, item 7): MASPO, GRPO and unclipped PG on a contextual bandit.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 .venv/bin/python tools/mechanism_check.py \
        [--seeds 30] [--lrs 0.1 0.3 1.0] [--steps 30] [--workers 1] [--out docs/experiments/mechanism]

Every arm (tools/_mechanism_bandit.py: default_arms) is trained with the project's own
policy_loss / aggregate_loss for every learning rate and seed; the seed fixes the problem, the
initial policy and every random draw, so differences between arms are paired by seed. Writes
<out>/mechanism.json (config, per-run metrics, pooled gate statistics, preconditions, paired
differences with 95 % t intervals), <out>/mechanism.md (the tables) and <out>/mechanism.png.
Exit status 0, or 2 for a bad option.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from _evidence_stats import all_hold, paired_difference, preconditions, trapezoid_auc  # noqa: E402
from _mechanism_bandit import Arm, BanditConfig, check_arm, default_arms, run_arm  # noqa: E402

METRICS = ("auc", "final_reward", "final_entropy", "final_rare_mass")
REFERENCE_ARM = "grpo"
PAIRS = (("maspo", "grpo"), ("pg_unclipped", "grpo"), ("maspo_alpha0", "grpo"),
         ("maspo", "pg_unclipped"), ("maspo", "maspo_alpha0"))


def summarize_run(result: Dict[str, object]) -> Dict[str, float]:
    """The per-run numbers compared across arms, from run_arm's curves (index 0 = before any update)."""
    curves = result["curves"]
    reward = curves["expected_reward"]
    return {"auc": trapezoid_auc(list(range(len(reward))), reward), "final_reward": reward[-1],
            "final_entropy": curves["entropy"][-1], "final_rare_mass": curves["rare_correct_mass"][-1]}


def _job(args: tuple) -> tuple:
    cfg, arm, seed, lr = args
    return arm.name, lr, seed, run_arm(cfg, arm, seed, lr)


def run_all(cfg: BanditConfig, arms: Sequence[Arm], seeds: Sequence[int], lrs: Sequence[float],
            workers: int = 1) -> Dict[str, object]:
    """Runs every arm x lr x seed; returns {runs: {arm: {lr: {seed: result}}}}, lr keys as strings."""
    for arm in arms:
        check_arm(arm)
    jobs = [(cfg, arm, seed, lr) for lr in lrs for seed in seeds for arm in arms]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_job, jobs, chunksize=4)
    else:
        results = [_job(job) for job in jobs]
    runs: Dict[str, Dict[str, Dict[int, dict]]] = {}
    for name, lr, seed, result in results:
        runs.setdefault(name, {}).setdefault(str(lr), {})[seed] = result
    return runs


def pooled_statistics(results: Sequence[dict]) -> Dict[str, float]:
    """finalize_statistics over the SUMS of all runs (every optimizer step of every seed), plus the
    arm's own clip fraction (its loss's `clipped` metric, e.g. GRPO's clip and dual clip)."""
    import torch

    from maspo_megatron.algorithms import finalize_statistics

    total: Dict[str, float] = {}
    clipped = 0.0
    for result in results:
        for key, value in result["sums"].items():
            total[key] = total.get(key, 0.0) + value
        clipped += result["own_clipped_count"]
    stats = finalize_statistics({k: torch.tensor(v, dtype=torch.float64) for k, v in total.items()})
    stats["own_clip_frac"] = clipped / total["token_count"] if total.get("token_count") else math.nan
    return stats


def analyse(runs: Dict[str, Dict[str, Dict[int, dict]]], lrs: Sequence[float]) -> Dict[str, object]:
    """Per-run metrics, pooled statistics, preconditions per lr, paired differences (same lr, and each
    arm at its best lr by mean AUC against GRPO at its best lr)."""
    metrics = {arm: {lr: {seed: summarize_run(r) for seed, r in by_seed.items()} for lr, by_seed in by_lr.items()}
               for arm, by_lr in runs.items()}
    stats = {arm: {lr: pooled_statistics(list(by_seed.values())) for lr, by_seed in by_lr.items()}
             for arm, by_lr in runs.items()}
    checks = {}
    for lr in map(str, lrs):
        maspo = stats["maspo"][lr]
        checks[lr] = preconditions(stats[REFERENCE_ARM][lr]["maspo/ppo_clip_frac"],
                                   maspo["maspo/gate_weight_mean_gated"],
                                   {b: maspo[f"maspo/{b}/token_frac"] for b in ("p_lt_0.01", "p_0.01_0.1")})

    def column(arm: str, lr: str, metric: str) -> Dict[int, float]:
        return {seed: values[metric] for seed, values in metrics[arm][lr].items()}

    best_lr = {arm: max(by_lr, key=lambda lr, a=arm: sum(v["auc"] for v in metrics[a][lr].values()))
               for arm, by_lr in metrics.items()}
    paired = {"same_lr": {}, "best_lr": {}}
    for a, b in PAIRS:
        if a not in metrics or b not in metrics:
            continue
        key = f"{a} - {b}"
        paired["same_lr"][key] = {lr: {m: paired_difference(column(a, lr, m), column(b, lr, m)) for m in METRICS}
                                  for lr in map(str, lrs)}
        paired["best_lr"][key] = {m: paired_difference(column(a, best_lr[a], m), column(b, best_lr[b], m))
                                  for m in METRICS}
    return {"metrics": metrics, "stats": stats, "preconditions": checks,
            "preconditions_hold": {lr: all_hold(c) for lr, c in checks.items()}, "best_lr": best_lr,
            "paired": paired}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=30, help="paired seeds 1..N")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="Adam learning rates")
    parser.add_argument("--steps", type=int, default=BanditConfig.steps, help="RL steps per run")
    parser.add_argument("--workers", type=int, default=1, help="processes (one core each)")
    parser.add_argument("--out", default=str(REPO / "docs" / "experiments" / "mechanism"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.seeds < 2 or args.steps < 1 or args.workers < 1 or not all(lr > 0 for lr in args.lrs):
        print("mechanism_check: --seeds >= 2, --steps >= 1, --workers >= 1 and --lrs > 0 required", file=sys.stderr)
        return 2
    cfg = dataclasses.replace(BanditConfig(), steps=args.steps)
    arms = default_arms()
    seeds = list(range(1, args.seeds + 1))
    started = time.monotonic()
    runs = run_all(cfg, arms, seeds, args.lrs, args.workers)
    wall_s = time.monotonic() - started
    result = analyse(runs, args.lrs)
    result.update(config=dataclasses.asdict(cfg), arms=[dataclasses.asdict(a) for a in arms], seeds=seeds,
                  lrs=args.lrs, wall_s=round(wall_s, 1), workers=args.workers,
                  curves={arm: {lr: {seed: r["curves"]["expected_reward"] for seed, r in by_seed.items()}
                                for lr, by_seed in by_lr.items()} for arm, by_lr in runs.items()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mechanism.json").write_text(json.dumps(result, indent=1, default=float))
    from _mechanism_report import plot_mechanism, write_markdown

    plot_mechanism(result, out / "mechanism.png")
    (out / "mechanism.md").write_text(write_markdown(result))
    print(f"mechanism_check: {len(arms)} arms x {len(args.lrs)} lrs x {len(seeds)} seeds in {wall_s:.0f} s -> {out}")
    for lr, ok in result["preconditions_hold"].items():
        print(f"  lr {lr}: preconditions {'hold' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__: List[str] = ["analyse", "main", "pooled_statistics", "run_all", "summarize_run"]
