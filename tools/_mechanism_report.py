"""Tables (Markdown) and the figure (PNG) of the mechanism check, from tools/mechanism_check.py's result dict."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List

from _evidence_stats import ci_verdict, describe_ci, paired_difference, preconditions_markdown

LABELS = {"grpo": "GRPO (clip 0.2, dual clip 3)", "maspo": "MASPO (defaults)",
          "pg_unclipped": "unclipped PG (MASPO, sigma = 1e6)", "maspo_alpha0": "MASPO alpha = 0"}
COLORS = {"grpo": "tab:blue", "maspo": "tab:red", "pg_unclipped": "tab:gray", "maspo_alpha0": "tab:orange"}
METRIC_NAMES = {"auc": "AUC of J (mean J over steps 0..T)", "final_reward": "final J",
                "final_entropy": "final entropy (nats)", "final_rare_mass": "final mass on rare correct actions"}


def _mean_ci(values: List[float]) -> tuple:
    """(mean, half width of the 95 % t interval) of one arm's per-seed values (a difference against 0)."""
    diff = paired_difference(dict(enumerate(values)), {i: 0.0 for i in range(len(values))})
    return diff["mean"], diff["half_width"]


def plot_mechanism(result: Dict[str, object], path: Path) -> None:
    """Row 1: J per step, mean and 95 % band per arm; row 2: J(arm) - J(GRPO) per step, paired, with 95 % band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = [str(lr) for lr in result["lrs"]]
    curves = result["curves"]
    fig, axes = plt.subplots(2, len(lrs), figsize=(4.2 * len(lrs), 6.5), squeeze=False, sharex=True)
    for col, lr in enumerate(lrs):
        for arm, by_lr in curves.items():
            per_seed = by_lr[lr]
            seeds = sorted(per_seed)
            steps = range(len(per_seed[seeds[0]]))
            stats = [_mean_ci([per_seed[s][t] for s in seeds]) for t in steps]
            mean = [m for m, _ in stats]
            axes[0][col].plot(steps, mean, color=COLORS.get(arm), label=LABELS.get(arm, arm))
            axes[0][col].fill_between(steps, [m - h for m, h in stats], [m + h for m, h in stats],
                                      color=COLORS.get(arm), alpha=0.2)
            if arm == "grpo":
                continue
            ref = curves["grpo"][lr]
            diffs = [paired_difference({s: per_seed[s][t] for s in seeds}, {s: ref[s][t] for s in seeds})
                     for t in steps]
            axes[1][col].plot(steps, [d["mean"] for d in diffs], color=COLORS.get(arm), label=LABELS.get(arm, arm))
            axes[1][col].fill_between(steps, [d["low"] for d in diffs], [d["high"] for d in diffs],
                                      color=COLORS.get(arm), alpha=0.2)
        axes[0][col].set_title(f"Adam lr {lr}")
        axes[1][col].axhline(0.0, color="black", lw=0.8)
        axes[1][col].set_xlabel("RL step")
    axes[0][0].set_ylabel("expected reward J (exact)")
    axes[1][0].set_ylabel("J(arm) - J(GRPO), paired")
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Mechanism check: bandit, {len(result['seeds'])} paired seeds, mean and 95 % t band", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _stats_table(result: Dict[str, object]) -> str:
    keys = [("own_clip_frac", "own clip fraction"), ("maspo/ppo_clip_frac", "PPO clip frac at 0.2"),
            ("maspo/gate_weight_mean_gated", "gate weight on gated tokens"),
            ("maspo/abs_log_ratio_mean", "mean abs(log r)"),
            ("maspo/p_lt_0.01/token_frac", "tokens p_old<0.01"), ("maspo/p_0.01_0.1/token_frac", "tokens 0.01-0.1"),
            ("maspo/p_lt_0.01/gate_weight_mean", "gate weight p_old<0.01"),
            ("maspo/p_0.1_0.5/gate_weight_mean", "gate weight 0.1-0.5")]
    lines = ["| lr | arm | " + " | ".join(name for _, name in keys) + " |", "|---" * (len(keys) + 2) + "|"]
    for lr in map(str, result["lrs"]):
        for arm, by_lr in result["stats"].items():
            values = [by_lr[lr].get(k, math.nan) for k, _ in keys]
            lines.append(f"| {lr} | {LABELS.get(arm, arm)} | " + " | ".join(f"{v:.4f}" for v in values) + " |")
    return "\n".join(lines)


def _arm_table(result: Dict[str, object]) -> str:
    lines = ["| lr | arm | " + " | ".join(METRIC_NAMES.values()) + " |", "|---" * (len(METRIC_NAMES) + 2) + "|"]
    for lr in map(str, result["lrs"]):
        for arm, by_lr in result["metrics"].items():
            cells = []
            for metric in METRIC_NAMES:
                mean, half = _mean_ci([v[metric] for v in by_lr[lr].values()])
                cells.append(f"{mean:.4f} ± {half:.4f}")
            lines.append(f"| {lr} | {LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _paired_table(result: Dict[str, object]) -> str:
    metrics = ["auc", "final_reward", "final_rare_mass"]
    lines = ["| lr | difference | " + " | ".join(METRIC_NAMES[m] for m in metrics) + " |",
             "|---" * (len(metrics) + 2) + "|"]
    for lr in map(str, result["lrs"]):
        for pair, by_lr in result["paired"]["same_lr"].items():
            cells = [f"{describe_ci(by_lr[lr][m])}, {ci_verdict(by_lr[lr][m])}" for m in metrics]
            lines.append(f"| {lr} | {pair} | " + " | ".join(cells) + " |")
    best = result["best_lr"]
    for pair, diffs in result["paired"]["best_lr"].items():
        a, b = pair.split(" - ")
        cells = [f"{describe_ci(diffs[m])}, {ci_verdict(diffs[m])}" for m in metrics]
        lines.append(f"| best ({best[a]} vs {best[b]}) | {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(result: Dict[str, object]) -> str:
    """The check's tables: preconditions per lr, per-arm means, gate statistics, paired differences."""
    parts = [f"Mechanism check: {len(result['seeds'])} paired seeds, learning rates {result['lrs']}, "
             f"{result['config']['steps']} RL steps, wall time {result['wall_s']} s ({result['workers']} worker(s)).", ""]
    for lr, checks in result["preconditions"].items():
        verdict = "hold" if result["preconditions_hold"][lr] else "DO NOT hold: a MASPO-vs-GRPO verdict at this lr is inconclusive"
        parts += [f"Preconditions at lr {lr} ({verdict}):", "", preconditions_markdown(checks), ""]
    parts += ["Per arm (mean ± 95 % t half-width over seeds):", "", _arm_table(result), "",
              "Gate statistics, pooled over every optimizer step of every seed (the `maspo/*` columns use the "
              "arm's MASPO hyperparameters, defaults for GRPO: what MASPO's gate would have done):", "",
              _stats_table(result), "",
              "Paired differences (mean [95 % t interval] over seeds; 'higher'/'lower' when the interval excludes 0):",
              "", _paired_table(result), ""]
    return "\n".join(parts)
