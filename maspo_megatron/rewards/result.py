"""What a reward function is given and what the scorer returns for it."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

REASON_CHARS = 200  # reasons travel in metrics and logs: keep them one short line


@dataclasses.dataclass(frozen=True)
class RewardSample:
    """One response to score: the model's text, the dataset's ground truth, the prompt's metadata."""

    response: str
    ground_truth: Any
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """A scored sample. `reason` is "correct", "wrong", "unparsable[: why]", "timeout" or "error: why"
    (a custom reward may return its own)."""

    reward: float
    reason: str

    @staticmethod
    def make(reward: float, reason: str) -> RewardResult:
        reason = " ".join(str(reason).split())
        if len(reason) > REASON_CHARS:
            reason = reason[: REASON_CHARS - 3] + "..."
        return RewardResult(float(reward), reason)


def as_sample(item: Any) -> RewardSample:
    """Accepts a RewardSample, a (response, ground_truth[, metadata]) tuple or a mapping with those keys."""
    if isinstance(item, RewardSample):
        sample = item
    elif isinstance(item, Mapping):
        sample = RewardSample(item["response"], item.get("ground_truth"), item.get("metadata") or {})
    elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
        sample = RewardSample(item[0], item[1], item[2] if len(item) == 3 and item[2] is not None else {})
    else:
        raise TypeError(f"reward sample: expected RewardSample, (response, ground_truth[, metadata]) or a mapping, got {type(item).__name__}")
    if isinstance(sample.response, (bytes, bytearray)):
        # Model output is untrusted: invalid UTF-8 is scored (as replacement characters), never raised on.
        sample = dataclasses.replace(sample, response=bytes(sample.response).decode("utf-8", errors="replace"))
    elif not isinstance(sample.response, str):
        raise TypeError(f"reward sample: response must be str or bytes, got {type(sample.response).__name__}")
    return sample


def to_result(value: Any) -> RewardResult:
    """Normalises what a reward function returned: a number, a RewardResult or (reward, reason)."""
    if isinstance(value, RewardResult):
        return RewardResult.make(value.reward, value.reason)
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return RewardResult.make(float(value), "scored")
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return RewardResult.make(float(value[0]), str(value[1]))
    raise TypeError(f"reward function returned {type(value).__name__}; expected a number, RewardResult or (reward, reason)")
