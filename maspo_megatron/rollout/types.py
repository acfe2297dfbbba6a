"""The rollout interface every engine implements: prompts in, `n` `Sample`s per prompt out.

Log-prob convention (all engines): `Sample.log_probs[t]` is the log-probability of response token
t under the temperature-scaled full-vocabulary distribution, `log_softmax(logits / T)`, computed in
fp32. top-p / top-k truncation restricts which tokens can be drawn but does not renormalise the
reported log-prob; this is what SGLang returns and what the trainer can recompute from logits.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol, Sequence, runtime_checkable

import torch

FINISH_REASONS = ("stop", "length", "abort")


class RolloutError(RuntimeError):
    """A rollout engine could not produce the requested samples (message says which server / why)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What to sample. `top_k = -1` and `top_p = 1.0` switch those filters off."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature: {self.temperature} must be > 0 (greedy is top_k=1)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p} must be in (0, 1]")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k: {self.top_k} must be -1 (off) or >= 1")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {self.max_new_tokens} must be >= 1")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @classmethod
    def from_config(cls, rollout_cfg: Any, **overrides: Any) -> SamplingParams:
        """From a `RolloutConfig` (temperature, top_p, top_k, max_new_tokens), with overrides."""
        values = dict(
            temperature=rollout_cfg.temperature,
            top_p=rollout_cfg.top_p,
            top_k=rollout_cfg.top_k,
            max_new_tokens=rollout_cfg.max_new_tokens,
        )
        values.update(overrides)
        return cls(**values)


@dataclasses.dataclass
class Sample:
    """One generated response.

    token_ids[L]: response tokens only (a matched stop/eos token is included, as SGLang does).
    log_probs[L]: fp32, one per response token (see the module docstring for the convention).
    finish_reason: "stop" | "length" | "abort".
    weight_version: the engine's weight version when the sample was generated.
    """

    token_ids: list[int]
    log_probs: torch.Tensor
    finish_reason: str
    weight_version: int

    def __post_init__(self) -> None:
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"finish_reason: {self.finish_reason!r} is not one of {list(FINISH_REASONS)}")
        self.log_probs = torch.as_tensor(self.log_probs, dtype=torch.float32).reshape(-1)
        if self.log_probs.numel() != len(self.token_ids):
            raise ValueError(f"log_probs: {self.log_probs.numel()} values for {len(self.token_ids)} tokens")


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine. Methods an engine cannot honour are no-ops."""

    @property
    def weight_version(self) -> int: ...

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        """`prompts[P][prompt_len]` token ids -> `P` lists of `n` samples each, in prompt order."""

    def pause_generation(self) -> None: ...

    def continue_generation(self) -> None: ...

    def flush_cache(self) -> None: ...

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None: ...

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None: ...

    def shutdown(self) -> None: ...


HANDOVER_HOOKS = ("before_train", "after_train", "after_weight_sync")


def memory_handover(engine: Any, hook: str) -> None:
    """Calls the engine's colocated GPU-memory hook `hook` (one of HANDOVER_HOOKS) when it has one: the
    SGLang engine releases / resumes its servers' memory around training and weight sync; an engine
    with no GPU memory of its own to hand over (the in-process CPU engine) has none."""
    if hook not in HANDOVER_HOOKS:
        raise ValueError(f"memory_handover: {hook!r} is not one of {list(HANDOVER_HOOKS)}")
    method = getattr(engine, hook, None)
    if method is not None:
        method()
