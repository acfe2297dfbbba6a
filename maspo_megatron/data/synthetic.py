"""A synthetic verifiable task: short arithmetic problems generated from a seed.

Made for the CPU default: prompts and answers are a few characters (`3+4=` -> `\\boxed{7}`) so a
tiny character-level model can learn the task in minutes, and the difficulty is a config knob
(number of operands, operand range, operations, phrasing). Answers are integers, so math-verify
checks them exactly; `reference_response` gives the answer in the format the model should use,
for a supervised warm-up.
"""
from __future__ import annotations

import random
from typing import Any

from maspo_megatron.data.prompts import RawPrompt

_WORDS = {"+": "plus", "-": "minus", "*": "times"}
_WORD_TEMPLATES = ("What is {expr}?", "Compute {expr}.", "{expr} is?")
_MAX_RETRIES = 100


def format_answer(answer: Any, answer_format: str) -> str:
    """The response text the task expects: `\\boxed{7}`, `#### 7` or `7` (plain: score it with an
    anchored `reward.answer_pattern` such as `^\\s*(\\d+)\\s*$`, since math-verify's extraction
    looks for a boxed or `####` answer)."""
    if answer_format == "boxed":
        return "\\boxed{" + str(answer) + "}"
    if answer_format == "hash":
        return "#### " + str(answer)
    if answer_format == "plain":
        return str(answer)
    raise ValueError(f"answer_format: {answer_format!r} is not 'boxed', 'hash' or 'plain'")


class ArithmeticTask:
    """Generates problems deterministically from (seed, split). Config: `SyntheticTaskConfig`."""

    def __init__(self, config: Any, seed: int = 0):
        self.config = config
        self.seed = seed

    def _problem(self, rng: random.Random) -> tuple[list[int], list[str], int]:
        cfg = self.config
        for _ in range(_MAX_RETRIES):
            operands = [rng.randint(cfg.min_operand, cfg.max_operand) for _ in range(cfg.num_operands)]
            operations = [rng.choice(cfg.operations) for _ in range(cfg.num_operands - 1)]
            answer = _evaluate(operands, operations)
            if answer >= 0:  # negative answers would need a sign the tiny model rarely sees
                return operands, operations, answer
        operations = ["+" if op == "-" else op for op in operations]
        return operands, operations, _evaluate(operands, operations)

    def _phrase(self, operands: list[int], operations: list[str], rng: random.Random) -> str:
        style = self.config.templates
        if style == "mixed":
            style = rng.choice(("symbolic", "words"))
        if style == "symbolic":
            return "".join(f"{a}{op}" for a, op in zip(operands, operations + ["="], strict=True))
        expr = " ".join(f"{a} {_WORDS[op]}" for a, op in zip(operands[:-1], operations, strict=True)) + f" {operands[-1]}"
        return rng.choice(_WORD_TEMPLATES).format(expr=expr)

    def generate(self, count: int, split: str = "train") -> list[RawPrompt]:
        """`count` problems of `split` ("train", "val", ...); the same (seed, split, config) gives the same list."""
        rng = random.Random(f"maspo-arithmetic:{self.seed}:{split}")
        # its own stream, so the problems are the same with and without noise
        noise_rng = random.Random(f"maspo-arithmetic-noise:{self.seed}:{split}")
        noise = self.config.reference_noise if split == "train" else 0.0
        raws = []
        for i in range(count):
            operands, operations, answer = self._problem(rng)
            text = self._phrase(operands, operations, rng)
            shown = noisy_answer(answer, noise, noise_rng)
            metadata = {
                "task": "arithmetic",
                "operands": operands,
                "operations": operations,
                "reference": format_answer(shown, self.config.answer_format),
            }
            raws.append(RawPrompt(text, str(answer), metadata, f"synthetic:{split}:{i}"))
        return raws


def noisy_answer(answer: int, noise: float, rng: random.Random) -> int:
    """`answer`, or with probability `noise` the same with one digit replaced by a different one (never
    a leading zero): an imperfect demonstration (`reference_noise`). Draws from `rng` either way."""
    if rng.random() >= noise:
        return answer
    digits = list(str(answer))
    position = rng.randrange(len(digits))
    lowest = 1 if position == 0 and len(digits) > 1 else 0
    digits[position] = rng.choice([d for d in "0123456789"[lowest:] if d != digits[position]])
    return int("".join(digits))


def _evaluate(operands: list[int], operations: list[str]) -> int:
    """Usual precedence (`*` before `+`/`-`), evaluated without eval()."""
    terms = [operands[0]]
    signs = [1]
    for op, value in zip(operations, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= value
        else:
            terms.append(value)
            signs.append(1 if op == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms, strict=True))


def reference_response(item: Any, eos_token: str = "") -> str:
    """The ideal response for a synthetic item (from its metadata), for a supervised warm-up."""
    return item.metadata["reference"] + eos_token
