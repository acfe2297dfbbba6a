"""The evidence section of a sweep with a learning-rate grid (issue 18): preconditions first (on the
tokens with A != 0, and on every token for comparison), then paired differences against GRPO with
95 % t intervals, the training-reward and held-out Avg@k figure, and gate statistics per arm.

    lines, summary = evidence_section(sweep, runs_by_method, warm, figures, rel)

Per run, the held-out curve is the warm-up's Avg@k at step 0, every `trainer.eval_every` record of
metrics.jsonl and final_eval.json at the last step; AUC is its trapezoid mean (tools/_evidence_stats.py).
Gate statistics are pooled over every step of every seed of a method at one learning rate, each
step weighted by its token count (the trainer already pools a step's optimizer steps).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _evidence_stats import (
    LOW_P_BUCKETS,
    all_hold,
    ci_verdict,
    describe_ci,
    paired_difference,
    preconditions,
    preconditions_markdown,
    trapezoid_auc,
)
from _experiments_plan import HELDOUT_NAME, Sweep
from _experiments_stats import RunData, eval_key

REFERENCE = "grpo"
COMPARED = ("maspo", "pg_unclipped", "maspo_alpha0", "clip_higher", "sapo")  # against GRPO, those the sweep has
ABLATIONS = ("pg_unclipped", "maspo_alpha0")  # against MASPO
ALL_TOKENS, ACTIVE_TOKENS = "maspo", "maspo_active"  # metric prefixes: every response token / tokens with A != 0
REWARD_KEY = "rollout/reward_mean"


def heldout_curve(run: RunData, warm: Optional[dict]) -> Tuple[List[int], List[float]]:
    """(steps, held-out Avg@k): warm-up at 0, periodic evaluations, the final evaluation at the last step."""
    points: Dict[int, float] = {}
    _, start = eval_key(warm, HELDOUT_NAME, "avg")
    if math.isfinite(start):
        points[0] = start
    for record in run.records:
        _, value = eval_key(record, HELDOUT_NAME, "avg")
        if math.isfinite(value):
            points[int(record["step"])] = value
    _, final = eval_key(run.final_eval, HELDOUT_NAME, "avg")
    if math.isfinite(final) and run.records:
        points[int(run.records[-1]["step"])] = final
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def _number(record: dict, key: str, missing: float = math.nan) -> float:
    """record[key] as a float; NaN for a non-finite statistic (nothing gated in a step), which metrics.jsonl
    writes as null (files before 2026-12-05: the string "nan")."""
    value = record.get(key, missing)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def pooled_gate_statistics(runs: List[RunData], prefix: str = ALL_TOKENS) -> Dict[str, float]:
    """Token-weighted pooling over all steps of all runs: PPO clip fraction at 0.2, gate weight on
    gated tokens, mean |log r|, and the token fraction of each low-p_old bucket. prefix: "maspo"
    (every response token) or "maspo_active" (the tokens with A != 0, logged since 2026-12-04)."""
    tokens = clipped = gated = gated_weight = log_ratio = 0.0
    bucket_tokens = {b: 0.0 for b in LOW_P_BUCKETS}
    for run in runs:
        for record in run.records:
            count = _number(record, f"{prefix}/token_count")
            if not count > 0:  # also False for NaN
                continue
            tokens += count
            clipped += _number(record, f"{prefix}/ppo_clip_frac", 0.0) * count
            log_ratio += _number(record, f"{prefix}/abs_log_ratio_mean", 0.0) * count
            gated_count = count * (_number(record, f"{prefix}/gated_pos_frac", 0.0)
                                   + _number(record, f"{prefix}/gated_neg_frac", 0.0))
            weight = _number(record, f"{prefix}/gate_weight_mean_gated")
            if gated_count > 0 and math.isfinite(weight):
                gated += gated_count
                gated_weight += weight * gated_count
            for bucket in LOW_P_BUCKETS:
                bucket_tokens[bucket] += _number(record, f"{prefix}/{bucket}/token_frac", 0.0) * count
    nan = math.nan
    return {"ppo_clip_frac": clipped / tokens if tokens else nan,
            "gate_weight_mean_gated": gated_weight / gated if gated else nan,
            "gated_frac": gated / tokens if tokens else nan,
            "abs_log_ratio_mean": log_ratio / tokens if tokens else nan,
            "token_count": tokens,
            **{f"{b}/token_frac": bucket_tokens[b] / tokens if tokens else nan for b in LOW_P_BUCKETS}}


def run_mean(runs: List[RunData], key: str) -> float:
    """Mean of a per-step metric over every step of every run (NaN when none has it)."""
    values = [v for run in runs for v in (_number(r, key) for r in run.records) if math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _by_base(sweep: Sweep, runs_by_method: Dict[str, List[RunData]]) -> Dict[str, Dict[float, List[RunData]]]:
    out: Dict[str, Dict[float, List[RunData]]] = {}
    for name, method in sweep.methods.items():
        if method.base is not None:
            out.setdefault(method.base, {})[method.lr] = runs_by_method.get(name, [])
    return out


def reward_curve(run: RunData) -> Tuple[List[int], List[float]]:
    """(steps, training reward): the mean reward of each step's rollout samples."""
    points = {int(r["step"]): _number(r, REWARD_KEY) for r in run.records if "step" in r}
    steps = sorted(s for s, v in points.items() if math.isfinite(v))
    return steps, [points[s] for s in steps]


def paired_curves(per_run: Dict[str, Dict[float, Dict[int, tuple]]]) -> Dict[str, Dict[float, Dict[int, tuple]]]:
    """curve(arm) − curve(GRPO) per seed and lr, at the steps both have; GRPO itself left out."""
    out: Dict[str, Dict[float, Dict[int, tuple]]] = {}
    reference = per_run.get(REFERENCE, {})
    for base, by_lr in per_run.items():
        if base == REFERENCE:
            continue
        for rate, by_seed in by_lr.items():
            for seed, (steps, values) in by_seed.items():
                ref = dict(zip(*reference.get(rate, {}).get(seed, ([], [])), strict=True))
                pairs = [(s, v - ref[s]) for s, v in zip(steps, values, strict=True) if s in ref]
                if pairs:
                    out.setdefault(base, {}).setdefault(rate, {})[seed] = ([p[0] for p in pairs],
                                                                           [p[1] for p in pairs])
    return out


def _band(ax, curves: Dict[int, tuple], label: str, color: str) -> None:
    """Mean over seeds and its 95 % t band at every step any seed has."""
    steps = sorted({s for steps, _ in curves.values() for s in steps})
    means, lows, highs = [], [], []
    for step in steps:
        values = {seed: dict(zip(*c, strict=True)).get(step, math.nan) for seed, c in curves.items()}
        diff = paired_difference(values, {seed: 0.0 for seed in values})
        means.append(diff["mean"])
        lows.append(diff["low"])
        highs.append(diff["high"])
    if steps:
        ax.plot(steps, means, marker="o" if len(steps) < 12 else None, label=f"{label} (n={len(curves)})",
                color=color)
        ax.fill_between(steps, lows, highs, alpha=0.15, color=color)


def _plot(path: Path, rows: List[Tuple[str, Dict[str, Dict[float, Dict[int, tuple]]]]], rates: List[float],
          labels) -> None:
    """One row per (y label, curves[base][lr][seed] = (steps, values)), one column per learning rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), len(rates), figsize=(4.5 * len(rates), 3.4 * len(rows)), squeeze=False,
                             sharex=True)
    colors = {base: f"C{i}" for i, base in enumerate(rows[0][1])}  # one color per arm in every panel
    for row, (ylabel, per_run) in enumerate(rows):
        for col, rate in enumerate(rates):
            ax = axes[row][col]
            for base, by_lr in per_run.items():
                _band(ax, by_lr.get(rate, {}), labels.get(base, base), colors.get(base, "k"))
            ax.set_title(f"lr {rate:g}")
            ax.grid(alpha=0.3)
            if row < 2:  # rates in [0, 1]; a t band may overshoot them
                ax.set_ylim(-0.05, 1.05)
            else:
                ax.axhline(0.0, color="black", linewidth=0.8)
        axes[row][0].set_ylabel(ylabel)
    for col in range(len(rates)):
        axes[-1][col].set_xlabel("RL step")
    if axes[0][0].get_legend_handles_labels()[0]:  # a test's one-arm figure may have nothing to label
        axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _preconditions_at(grid, rate: float, prefix: str) -> List[dict]:
    ref = pooled_gate_statistics(grid.get(REFERENCE, {}).get(rate, []), prefix)
    maspo = pooled_gate_statistics(grid.get("maspo", {}).get(rate, []), prefix)
    return preconditions(ref["ppo_clip_frac"], maspo["gate_weight_mean_gated"],
                         {b: maspo[f"{b}/token_frac"] for b in LOW_P_BUCKETS})


def evidence_section(sweep: Sweep, runs_by_method: Dict[str, List[RunData]], warm: Dict[int, dict],
                     figures: Path, rel: str) -> Tuple[List[str], dict]:
    """Markdown lines (preconditions, paired differences, verdicts, gate statistics per arm) and the
    numbers behind them. The verdict needs the preconditions on the tokens with A != 0 (the only ones
    a clip or a gate can touch); runs without those metrics fall back to every token."""
    grid = _by_base(sweep, runs_by_method)
    labels = {m.base: m.label.rsplit(", lr", 1)[0] for m in sweep.methods.values() if m.base}
    rates = sweep.learning_rates
    per_run = {base: {lr: {run.seed: heldout_curve(run, warm.get(run.seed)) for run in runs}
                      for lr, runs in by_lr.items()} for base, by_lr in grid.items()}
    rewards = {base: {lr: {run.seed: reward_curve(run) for run in runs} for lr, runs in by_lr.items()}
               for base, by_lr in grid.items()}
    metric = {base: {lr: {seed: {"auc": trapezoid_auc(*curve), "final": curve[1][-1] if curve[1] else math.nan}
                          for seed, curve in by_seed.items()} for lr, by_seed in by_lr.items()}
              for base, by_lr in per_run.items()}
    _plot(figures / "heldout_vs_step.png", [("training reward", rewards), (f"held-out Avg@k ({HELDOUT_NAME})",
                                                                            per_run),
                                             ("held-out Avg@k, arm − GRPO (paired)", paired_curves(per_run))],
          rates, labels)
    out = ["## Evidence: preconditions, then paired differences against GRPO", ""]
    checks, checks_all = {}, {}
    for rate in rates:
        checks_all[rate] = _preconditions_at(grid, rate, ALL_TOKENS)
        active = _preconditions_at(grid, rate, ACTIVE_TOKENS)
        has_active = math.isfinite(pooled_gate_statistics(grid.get(REFERENCE, {}).get(rate, []),
                                                          ACTIVE_TOKENS)["ppo_clip_frac"])
        checks[rate] = active if has_active else checks_all[rate]
        state = "hold" if all_hold(checks[rate]) else "DO NOT hold: any verdict at this lr is inconclusive"
        out += [f"Preconditions at lr {rate:g} ({state}), on the tokens with A != 0"
                + ("" if has_active else " (not logged by these runs: on every token instead)") + ":", "",
                preconditions_markdown(checks[rate]), "",
                f"The same on every response token (A = 0 tokens included; for comparison with earlier reports), "
                f"lr {rate:g}:", "", preconditions_markdown(checks_all[rate]), ""]

    def column(base, rate, key):
        return {seed: v[key] for seed, v in metric.get(base, {}).get(rate, {}).items()}

    best = {base: max(by_lr, key=lambda r, b=base: _mean(column(b, r, "auc"))) for base, by_lr in metric.items()
            if by_lr}
    out += ["Paired differences (method − GRPO, same seed), mean [95 % t interval]:", "",
            "| comparison | lr | Δ AUC of held-out Avg | Δ final held-out Avg | verdict |", "|---|---|---|---|---|"]
    summary = {"preconditions": {str(r): c for r, c in checks.items()},
               "preconditions_all_tokens": {str(r): c for r, c in checks_all.items()}, "best_lr": best,
               "metric": metric, "paired": {}, "arms": {}}
    def compare(a: str, rate_a: float, b: str, rate_b: float, shown: str, rate_name: str) -> None:
        """One paired row a - b (same seeds): AUC and final differences, the verdict where the
        preconditions hold at both lrs; into the table and the summary."""
        auc = paired_difference(column(a, rate_a, "auc"), column(b, rate_b, "auc"))
        final = paired_difference(column(a, rate_a, "final"), column(b, rate_b, "final"))
        hold = all_hold(checks[rate_a]) and all_hold(checks[rate_b])
        verdict = ci_verdict(auc) if hold else "inconclusive (preconditions fail)"
        summary["paired"][f"{a} - {b} @ {rate_name}"] = {"auc": auc, "final": final, "verdict": verdict}
        out.append(f"| {shown} | {rate_name} | {describe_ci(auc)} | {describe_ci(final)} | {verdict} |")

    for base in COMPARED:
        if base not in metric or REFERENCE not in metric:
            continue
        shown = f"{labels.get(base, base)} − GRPO"
        for rate in rates:
            compare(base, rate, REFERENCE, rate, shown, f"{rate:g}")
        compare(base, best[base], REFERENCE, best[REFERENCE], shown,
                f"best: {best[base]:g} vs {best[REFERENCE]:g}")
    # MASPO against its own ablations: does the gate's shape (vs no gate) or the mass term (vs alpha = 0) matter?
    for base in ABLATIONS:
        if base not in metric or "maspo" not in metric:
            continue
        for rate in rates:
            compare("maspo", rate, base, rate, f"MASPO − {labels.get(base, base)}", f"{rate:g}")
    out += ["", "The best lr of a method is the one with the highest mean AUC over its seeds (chosen on the same "
            "runs it is compared on: an optimistic choice, the same for every method).", "",
            f"![reward and held-out Avg vs step]({rel}/heldout_vs_step.png)", "",
            "Top: training reward per RL step; middle: held-out Avg@k (step 0 = the warm-up); bottom: held-out "
            "Avg@k minus GRPO's on the same seed. Mean over seeds with its 95 % t band (cut at [0, 1] in the "
            "top rows).", "",
            "Per arm (every step of every seed pooled, token-weighted; A != 0 tokens where logged): the "
            "statistics of MASPO's gate are computed for every loss with the arm's `algorithm.maspo` settings "
            "(the defaults for GRPO, so there they say what MASPO's gate would have done to GRPO's updates; "
            "sigma 1e6 for unclipped PG, whose gate weight is therefore 1).", "",
            "| arm | lr | Avg@k start → final (mean) | AUC (mean) | entropy (nats/token) | mean abs log r | "
            "clip frac (PPO 0.2) | gated frac | gate weight on gated | p_old < 0.01 | 0.01 <= p_old < 0.1 |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for base, by_lr in grid.items():
        for rate in rates:
            runs = by_lr.get(rate, [])
            if not runs:
                continue
            prefix = ACTIVE_TOKENS if math.isfinite(pooled_gate_statistics(runs, ACTIVE_TOKENS)["ppo_clip_frac"]) \
                else ALL_TOKENS
            stats = pooled_gate_statistics(runs, prefix)
            start = _mean({s: c[1][0] for s, c in per_run[base][rate].items() if c[1]})
            final = _mean(column(base, rate, "final"))
            auc = _mean(column(base, rate, "auc"))
            entropy = run_mean(runs, "train/entropy")
            summary["arms"][f"{base} @ {rate:g}"] = {**stats, "prefix": prefix, "entropy": entropy, "start": start,
                                                     "final": final, "auc": auc}
            out.append(f"| {labels.get(base, base)} | {rate:g} | {start:.3f} → {final:.3f} | {auc:.3f} | "
                       f"{entropy:.3f} | {stats['abs_log_ratio_mean']:.4f} | {stats['ppo_clip_frac']:.4f} | "
                       f"{stats['gated_frac']:.4f} | {stats['gate_weight_mean_gated']:.4f} | "
                       f"{stats['p_lt_0.01/token_frac']:.4f} | {stats['p_0.01_0.1/token_frac']:.4f} |")
    out.append("")
    return out, summary


def _mean(values: Dict[int, float]) -> float:
    finite = [v for v in values.values() if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else -math.inf
