"""Dynamic sampling (DAPO): keep only groups whose rewards differ, refilling with extra rounds.

A group whose n rewards are all equal has zero advantage everywhere: it costs a forward/backward
and teaches nothing. `collect_groups` asks the trainer's `generate_and_score(prompts) -> groups`
for more groups until `num_groups` informative ones are found or `max_extra_rounds` refills are
spent, and reports what it dropped.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import torch

from maspo_megatron.algorithms import keep_groups


@dataclasses.dataclass
class DynamicSamplingStats:
    rounds: int = 0  # generation rounds run (1 = no refill was needed)
    prompts_generated: int = 0
    groups_kept: int = 0  # returned to the trainer
    groups_dropped: int = 0  # all-equal rewards
    groups_surplus: int = 0  # informative, but beyond num_groups (discarded)
    groups_padded: int = 0  # dropped groups put back to reach num_groups (pad_with_dropped)
    short: bool = False  # fewer than num_groups informative groups after the last round

    def as_metrics(self, prefix: str = "dynamic_sampling/") -> dict:
        return {prefix + k: float(v) for k, v in dataclasses.asdict(self).items()}


def _rewards(group: Any) -> Sequence[float]:
    if isinstance(group, dict):
        return group["rewards"]
    return group.rewards


def collect_groups(
    next_prompts: Callable[[int], list],
    generate_and_score: Callable[[list], list],
    *,
    num_groups: int,
    group_size: int,
    max_extra_rounds: int = 3,
    oversample_factor: float = 1.0,
    enabled: bool = True,
    pad_with_dropped: bool = False,
    rewards_of: Optional[Callable[[Any], Sequence[float]]] = None,
) -> tuple[list, DynamicSamplingStats]:
    """Returns (groups, stats): up to `num_groups` groups with non-identical rewards.

    next_prompts(k): the next k prompts (e.g. `lambda k: sampler.next_items(dataset, k)`).
    generate_and_score(prompts): one group per prompt, each with `group_size` rewards
    (`group.rewards`, `group["rewards"]`, or via `rewards_of`). A refill round asks for the missing
    count x `oversample_factor`, divided by the keep rate seen so far (at least 1/4), so a hard
    batch converges in few rounds. With `enabled=False` it is one round with nothing dropped.
    """
    if num_groups < 1 or group_size < 1:
        raise ValueError(f"collect_groups: num_groups={num_groups} and group_size={group_size} must be >= 1")
    rewards_of = rewards_of or _rewards
    stats = DynamicSamplingStats()
    kept: list = []
    dropped: list = []
    seen = 0
    while True:
        missing = num_groups - len(kept)
        if stats.rounds == 0:
            request = math.ceil(num_groups * (oversample_factor if enabled else 1.0))
        else:
            keep_rate = max(len(kept) / max(seen, 1), 0.25)
            request = math.ceil(missing * oversample_factor / keep_rate)
        prompts = next_prompts(request)
        groups = generate_and_score(prompts)
        if len(groups) != len(prompts):
            raise ValueError(f"generate_and_score returned {len(groups)} groups for {len(prompts)} prompts")
        stats.rounds += 1
        stats.prompts_generated += len(prompts)
        seen += len(groups)
        if not enabled:
            kept.extend(groups)
            break
        flat = [float(r) for g in groups for r in _checked(rewards_of(g), group_size)]
        mask = keep_groups(torch.tensor(flat, dtype=torch.float64), group_size).tolist()
        for group, keep in zip(groups, mask, strict=True):
            (kept if keep else dropped).append(group)
        stats.groups_dropped += mask.count(False)
        if len(kept) >= num_groups or stats.rounds > max_extra_rounds:
            break
    stats.groups_surplus = max(0, len(kept) - num_groups)
    kept = kept[:num_groups]
    stats.short = len(kept) < num_groups
    if stats.short and pad_with_dropped:
        padding = dropped[: num_groups - len(kept)]
        stats.groups_padded = len(padding)
        kept.extend(padding)
    stats.groups_kept = len(kept)
    return kept, stats


def _checked(rewards: Sequence[float], group_size: int) -> Sequence[float]:
    if len(rewards) != group_size:
        raise ValueError(f"collect_groups: a group has {len(rewards)} rewards, expected group_size={group_size}")
    return rewards
