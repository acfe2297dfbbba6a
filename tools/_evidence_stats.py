"""Paired-seed statistics and the experiment's preconditions, shared by the mechanism check
(tools/mechanism_check.py) and the full sweep's report (tools/_experiments_evidence.py).

Pure Python (no scipy in the project's environment): the Student-t quantile comes from the
regularized incomplete beta function (Lentz's continued fraction) and a bisection on the CDF.

Preconditions (issue 18): an experiment can only say something about the gate if the gate acts.
    GRPO clip fraction (PPO clip at eps 0.2)        >= MIN_CLIP_FRAC
    MASPO mean gate weight on gated tokens          <= MAX_GATED_WEIGHT
    low-p_old buckets (p < 0.01, 0.01 <= p < 0.1)   each >= MIN_LOW_P_TOKEN_FRAC of the tokens
If one fails, a verdict on MASPO vs GRPO is "inconclusive", whatever the differences say.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

MIN_CLIP_FRAC = 0.05
MAX_GATED_WEIGHT = 0.95
MIN_LOW_P_TOKEN_FRAC = 0.01
LOW_P_BUCKETS = ("p_lt_0.01", "p_0.01_0.1")


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b) for 0 <= x <= 1, a, b > 0."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / (df + t * t), df / 2.0, 0.5)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection to 1e-12."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: need 0 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = -1e6, 1e6
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low < 1e-12:
            break
    return 0.5 * (low + high)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Dict[str, object]:
    """a[seed] - b[seed] over the seeds both have (finite values only), with a t confidence interval.

    Returns {n, mean, sd, half_width, low, high, per_seed: {seed: diff}}; with n < 2 the sd and the
    interval are NaN (one pair says nothing about the spread).
    """
    diffs = {s: float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))
             if math.isfinite(float(a[s])) and math.isfinite(float(b[s]))}
    values = list(diffs.values())
    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        sd = half = math.nan
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half_width": half, "low": mean - half, "high": mean + half,
            "per_seed": diffs}


def describe_ci(diff: Mapping[str, object], digits: int = 4) -> str:
    """'+0.0123 [+0.0040, +0.0206] (n=30)' or 'n/a'."""
    if not diff["n"]:
        return "n/a"
    if not math.isfinite(diff["half_width"]):
        return f"{diff['mean']:+.{digits}f} (n={diff['n']}, no interval)"
    return f"{diff['mean']:+.{digits}f} [{diff['low']:+.{digits}f}, {diff['high']:+.{digits}f}] (n={diff['n']})"


def ci_verdict(diff: Mapping[str, object]) -> str:
    """'higher' / 'lower' when the interval excludes 0, 'no resolved difference' otherwise."""
    if not diff["n"] or not math.isfinite(diff["half_width"]):
        return "no interval"
    if diff["low"] > 0:
        return "higher"
    if diff["high"] < 0:
        return "lower"
    return "no resolved difference"


def preconditions(grpo_clip_frac: float, maspo_gated_weight: float,
                  low_p_token_frac: Mapping[str, float]) -> List[Dict[str, object]]:
    """The checks of the module docstring: [{name, value, threshold, ok}], in print order."""
    checks = [
        {"name": "GRPO clip fraction (PPO clip at 0.2)", "value": grpo_clip_frac,
         "threshold": f">= {MIN_CLIP_FRAC}", "ok": math.isfinite(grpo_clip_frac) and grpo_clip_frac >= MIN_CLIP_FRAC},
        {"name": "MASPO mean gate weight on gated tokens", "value": maspo_gated_weight,
         "threshold": f"<= {MAX_GATED_WEIGHT}",
         "ok": math.isfinite(maspo_gated_weight) and maspo_gated_weight <= MAX_GATED_WEIGHT},
    ]
    for bucket in LOW_P_BUCKETS:
        frac = float(low_p_token_frac.get(bucket, math.nan))
        checks.append({"name": f"MASPO token fraction with {bucket}", "value": frac,
                       "threshold": f">= {MIN_LOW_P_TOKEN_FRAC}",
                       "ok": math.isfinite(frac) and frac >= MIN_LOW_P_TOKEN_FRAC})
    return checks


def preconditions_markdown(checks: Sequence[Mapping[str, object]]) -> str:
    lines = ["| precondition | measured | required | holds |", "|---|---|---|---|"]
    for check in checks:
        lines.append(f"| {check['name']} | {check['value']:.4f} | {check['threshold']} | "
                     f"{'yes' if check['ok'] else '**no**'} |")
    return "\n".join(lines)


def all_hold(checks: Sequence[Mapping[str, object]]) -> bool:
    return all(check["ok"] for check in checks)


def trapezoid_auc(steps: Sequence[float], values: Sequence[float]) -> float:
    """Area under values(step) by the trapezoid rule, divided by the step span (a mean level); NaN if < 2 points."""
    if len(steps) < 2 or len(steps) != len(values):
        return math.nan
    area = sum((steps[i + 1] - steps[i]) * (values[i] + values[i + 1]) / 2 for i in range(len(steps) - 1))
    return area / (steps[-1] - steps[0])
