"""The driver's half of an RL step (global rank 0): prompts -> samples -> rewards -> advantages.

    samples, metrics = run_rollout(ctx, step)     # list[TrainSample] for the packer, and metrics

Failure handling, all reported in metrics instead of stopping the run:
- a reward function that raises or times out: the scorer returns the configured `reward.error`
  / `reward.timed_out` value with the reason; counted as rollout/reward_errors, reward_timeouts;
- an aborted sample (`finish_reason == "abort"`): scored as `reward.error` (its text is a
  fragment) and kept out of the training batch (rollout/aborted_samples);
- an empty response: scored as usual (it is simply wrong) and carries no loss tokens
  (rollout/empty_samples);
- a length-truncated response with `algorithm.mask_truncated`: scored and counted in its group's
  advantages as usual, then kept out of the training batch (rollout/masked_truncated);
- dynamic sampling that drops every group: an empty batch; the step trains nothing and says so.
"""
from __future__ import annotations

import dataclasses
import math
import time
import zlib
from typing import TYPE_CHECKING, Dict, List

import torch

from maspo_megatron.algorithms import group_advantages, overlong_penalty
from maspo_megatron.rollout import SamplingParams
from maspo_megatron.trainer.batch import TrainSample
from maspo_megatron.trainer.dynamic_sampling import collect_groups

if TYPE_CHECKING:  # annotations only: transformers and the reward pool are imported where they are built
    from transformers import PreTrainedTokenizerBase

    from maspo_megatron.config import Config
    from maspo_megatron.data import PromptDataset, PromptItem, PromptSampler
    from maspo_megatron.rewards import RewardScorer
    from maspo_megatron.rollout import RolloutEngine, Sample


@dataclasses.dataclass
class Group:
    """One prompt and its n samples, scored."""

    item: PromptItem
    samples: List[Sample]
    rewards: List[float]  # one per sample
    reasons: List[str]  # the scorer's reason per sample ("correct", "timeout", "abort", ...)


@dataclasses.dataclass
class DriverContext:
    """What the driver needs each step (rank 0 only)."""

    cfg: Config
    engine: RolloutEngine
    scorer: RewardScorer
    tokenizer: PreTrainedTokenizerBase
    sampler: PromptSampler
    dataset: PromptDataset
    timings: Dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase since last read

    def add_time(self, key: str, seconds: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + seconds


def step_seed(base_seed: int, step: int, round_index: int) -> int:
    """A sampling seed per (run seed, step, generation round): a resumed run draws the same samples."""
    return zlib.crc32(f"{base_seed}:{step}:{round_index}".encode()) & 0x7FFFFFFF


def generate_groups(ctx: DriverContext, items: List[PromptItem], n: int, sampling: SamplingParams) -> List[Group]:
    """n samples for each prompt, decoded and scored (aborted samples get `reward.error`)."""
    if not items:
        return []
    started = time.perf_counter()
    outputs = ctx.engine.generate([item.prompt_ids for item in items], n, sampling)
    ctx.add_time("time/rollout_s", time.perf_counter() - started)
    batch, where = [], []
    for p, (item, samples) in enumerate(zip(items, outputs, strict=True)):
        for s, sample in enumerate(samples):
            if sample.finish_reason == "abort":
                continue
            text = ctx.tokenizer.decode(sample.token_ids, skip_special_tokens=True)
            batch.append((text, item.ground_truth, item.metadata))
            where.append((p, s))
    started = time.perf_counter()
    results = ctx.scorer.score(batch) if batch else []
    ctx.add_time("time/reward_s", time.perf_counter() - started)
    groups = [Group(item, list(samples), [ctx.cfg.reward.error] * n, ["abort"] * n)
              for item, samples in zip(items, outputs, strict=True)]
    for (p, s), result in zip(where, results, strict=True):
        groups[p].rewards[s] = result.reward
        groups[p].reasons[s] = result.reason
    return groups


def _advantages(cfg: Config, groups: List[Group]) -> torch.Tensor:
    n = cfg.rollout.n_samples_per_prompt
    rewards = torch.tensor([r for g in groups for r in g.rewards], dtype=torch.float64)
    if cfg.algorithm.overlong.enabled:
        lengths = torch.tensor([len(s.token_ids) for g in groups for s in g.samples])
        rewards = rewards + overlong_penalty(lengths, cfg.rollout.max_new_tokens, cfg.algorithm.overlong.buffer_tokens,
                                             cfg.algorithm.overlong.penalty).double()
    return group_advantages(rewards, n, cfg.algorithm.advantage, cfg.algorithm.advantage_eps)


def rollout_metrics(groups: List[Group]) -> dict:
    """rollout/* over every group generated this step (dropped ones included, so the curve is unbiased)."""
    samples = [s for g in groups for s in g.samples]
    rewards = [r for g in groups for r in g.rewards]
    reasons = [r for g in groups for r in g.reasons]
    if not samples:
        return {"rollout/reward_mean": math.nan, "rollout/num_samples": 0}
    lengths = [len(s.token_ids) for s in samples]
    mean = sum(rewards) / len(rewards)
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / max(len(rewards) - 1, 1))
    return {
        "rollout/reward_mean": mean,
        "rollout/reward_std": std,
        "rollout/accuracy": sum(r == "correct" for r in reasons) / len(reasons),
        "rollout/response_length_mean": sum(lengths) / len(lengths),
        "rollout/response_length_max": max(lengths),
        "rollout/truncated_frac": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "rollout/aborted_samples": sum(s.finish_reason == "abort" for s in samples),
        "rollout/empty_samples": sum(len(s.token_ids) == 0 for s in samples),
        "rollout/reward_errors": sum(r.startswith("error") for r in reasons),
        "rollout/reward_timeouts": sum(r == "timeout" for r in reasons),
        "rollout/num_samples": len(samples),
        "rollout/num_prompts": len(groups),
    }


def run_rollout(ctx: DriverContext, step: int) -> tuple[List[TrainSample], dict]:
    """(train samples of the kept groups, metrics). Group order is the prompt order of the sampler."""
    cfg = ctx.cfg
    n = cfg.rollout.n_samples_per_prompt
    generated: List[Group] = []
    rounds = [0]

    def generate_and_score(items: List[PromptItem]) -> List[Group]:
        sampling = SamplingParams.from_config(cfg.rollout, seed=step_seed(cfg.trainer.seed, step, rounds[0]))
        rounds[0] += 1
        groups = generate_groups(ctx, items, n, sampling)
        generated.extend(groups)
        return groups

    groups, stats = collect_groups(
        lambda k: ctx.sampler.next_items(ctx.dataset, k), generate_and_score,
        num_groups=cfg.trainer.prompts_per_step, group_size=n,
        max_extra_rounds=cfg.data.max_extra_rounds, oversample_factor=cfg.data.oversample_factor,
        enabled=cfg.data.dynamic_sampling)
    metrics = rollout_metrics(generated)
    metrics["rollout/dropped_groups"] = stats.groups_dropped
    metrics.update(stats.as_metrics())
    train_samples: List[TrainSample] = []
    if groups:
        advantages = _advantages(cfg, groups).tolist()
        flat = [(g.item, s) for g in groups for s in g.samples]
        masked_truncated = 0
        for (item, sample), advantage in zip(flat, advantages, strict=True):
            if sample.finish_reason == "abort" or len(sample.token_ids) == 0:
                continue
            if cfg.algorithm.mask_truncated and sample.finish_reason == "length":
                masked_truncated += 1
                continue
            train_samples.append(TrainSample(list(item.prompt_ids), list(sample.token_ids), float(advantage),
                                             sample.log_probs))
        metrics["rollout/advantage_abs_mean"] = sum(abs(a) for a in advantages) / len(advantages)
        metrics["rollout/masked_truncated"] = masked_truncated
    metrics["rollout/train_samples"] = len(train_samples)
    return train_samples, metrics
