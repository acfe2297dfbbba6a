"""The math reward: extract the final answer, parse both sides with math-verify, verify.

math-verify's own time limits use `signal.alarm`, which only works in a process's main thread and
would reset the one per-sample timer the scorer arms around each call (see worker.py). So they are
disabled here; the scorer's per-sample deadline (in-worker timer, then a kill from outside) bounds
every call instead.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import Any, Mapping, Optional

# Imported at module level so a forkserver that preloads this module hands it to every worker.
import math_verify

from maspo_megatron.rewards.extract import compile_pattern, extract_answer
from maspo_megatron.rewards.registry import register_reward
from maspo_megatron.rewards.result import RewardResult


@functools.lru_cache(maxsize=1)
def _math_verify():
    # It warns once per process that its timeouts are off: they are, on purpose (module docstring).
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_ground_truth(ground_truth: str) -> tuple:
    # Ground truths repeat n times per group: parse each once per worker.
    return tuple(_parse_latex(ground_truth))


def _parse_latex(answer: str) -> list:
    mv = _math_verify()
    wrapped = answer if "\\boxed" in answer else "\\boxed{" + answer + "}"
    return mv.parse(wrapped, parsing_timeout=None)


@functools.lru_cache(maxsize=16)
def _pattern(pattern: Optional[str]) -> Optional[re.Pattern]:
    return compile_pattern(pattern)


@register_reward("math")
def math_reward(
    response: str,
    ground_truth: Any,
    metadata: Optional[Mapping[str, Any]] = None,
    *,
    answer_pattern: Optional[str] = None,
    max_answer_chars: int = 512,
    correct: float = 1.0,
    wrong: float = 0.0,
    unparsable: float = 0.0,
) -> RewardResult:
    """`correct` if the last boxed / `#### n` / pattern answer equals `ground_truth` per math-verify."""
    answer = extract_answer(response, _pattern(answer_pattern))
    if answer is None:
        return RewardResult.make(unparsable, "unparsable: no final answer")
    if len(answer) > max_answer_chars:
        return RewardResult.make(unparsable, f"unparsable: answer longer than {max_answer_chars} chars")
    gold = _parse_ground_truth(str(ground_truth).strip())
    if not gold:
        return RewardResult.make(wrong, f"error: ground truth {str(ground_truth)[:60]!r} does not parse")
    predicted = _parse_latex(answer)
    if not predicted:
        return RewardResult.make(unparsable, "unparsable: answer does not parse")
    if _math_verify().verify(list(gold), predicted, timeout_seconds=None):
        return RewardResult.make(correct, "correct")
    return RewardResult.make(wrong, "wrong")


def _warm_up() -> None:
    math_reward("\\boxed{\\frac{1}{2}}", "0.5")


# Workers call this before reporting ready: the first parse builds math-verify's LaTeX parser
# (about a second), which must not count against the first sample's time limit.
math_reward.warm_up = _warm_up
