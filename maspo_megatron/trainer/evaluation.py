"""Evaluation metrics of the paper: Avg@n, Pass@n, mean response length, per validation set.

Avg@n is the mean correctness over all n samples of all prompts (the paper's headline metric,
Avg@32). Pass@k uses the unbiased estimator of Chen et al. (2021): for a prompt with n samples
of which c are correct, pass@k = 1 - C(n - c, k) / C(n, k); Pass@n is k = n (any correct).
"""
from __future__ import annotations

from math import comb
from typing import Dict, Sequence


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k for one prompt: the chance that k samples drawn from n include a correct one."""
    if not 0 <= num_correct <= num_samples:
        raise ValueError(f"num_correct: {num_correct} must be in [0, {num_samples}]")
    if not 1 <= k <= num_samples:
        raise ValueError(f"k: {k} must be in [1, {num_samples}]")
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def eval_metrics(dataset: str, correct: Sequence[Sequence[bool]], lengths: Sequence[Sequence[int]]) -> Dict[str, float]:
    """`correct[P][n]`, `lengths[P][n]` (response tokens) -> `eval/<dataset>/{avg@n, pass@n, mean_length}`.

    With n = 1 (greedy) avg@1 == pass@1 == accuracy.
    """
    if not correct:
        raise ValueError(f"eval/{dataset}: no prompts were evaluated")
    n = len(correct[0])
    if any(len(row) != n for row in correct) or len(lengths) != len(correct):
        raise ValueError(f"eval/{dataset}: every prompt needs the same number of samples ({n})")
    num_prompts = len(correct)
    avg = sum(sum(bool(c) for c in row) for row in correct) / (num_prompts * n)
    pass_n = sum(pass_at_k(n, sum(bool(c) for c in row), n) for row in correct) / num_prompts
    mean_length = sum(sum(row) for row in lengths) / (num_prompts * n)
    prefix = f"eval/{dataset}"
    return {f"{prefix}/avg@{n}": avg, f"{prefix}/pass@{n}": pass_n, f"{prefix}/mean_length": mean_length}
