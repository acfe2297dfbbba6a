"""`RewardScorer` (reusable, what the trainer holds) and `score_batch` (one-shot convenience)."""
from __future__ import annotations

import inspect
import os
import time
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from maspo_megatron.rewards.async_runner import score_async
from maspo_megatron.rewards.pool import WorkerPool
from maspo_megatron.rewards.registry import RewardError, get_reward
from maspo_megatron.rewards.result import RewardResult, RewardSample, as_sample
from maspo_megatron.rewards.worker import install_timer, score_one

# RewardConfig fields handed to a reward function that declares a parameter of that name.
_FORWARDED_FIELDS = ("answer_pattern", "max_answer_chars", "correct", "wrong", "unparsable")


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class RewardScorer:
    """Scores samples with one reward; sync rewards run in a worker pool started once.

        scorer = RewardScorer(cfg.reward)            # or RewardScorer(name="math", timeout_s=2)
        results = scorer.score([(response, ground_truth, metadata), ...])
        scorer.close()

    `num_workers=0` scores in the calling process (main thread for time limits; no memory limit,
    no isolation): for debugging and as the sequential baseline of benchmarks/rewards.py.
    """

    def __init__(self, config: Any = None, **overrides: Any):
        from maspo_megatron.config.data import RewardConfig

        if config is None:
            config = RewardConfig()
        fields = {**vars(config), **overrides}
        unknown = sorted(set(overrides) - set(vars(config)))
        if unknown:
            raise RewardError(f"RewardScorer: unknown option {unknown[0]!r} (known: {', '.join(sorted(vars(config)))})")
        self.name: str = fields["name"]
        self.timeout_s = float(fields["timeout_s"])
        self.fn: Callable = get_reward(self.name)
        self.values = {
            "timed_out": float(fields["timed_out"]),
            "error": float(fields["error"]),
        }
        self.options = self._options_for(self.fn, fields)
        self.is_async = inspect.iscoroutinefunction(self.fn)
        workers = fields["num_workers"]
        self.num_workers = _default_workers() if workers is None else int(workers)
        self._pool: Optional[WorkerPool] = None
        self._inline_latencies_s: list[float] = []
        if not self.is_async and self.num_workers > 0:
            self._pool = WorkerPool(
                self.fn, self.options, num_workers=self.num_workers, timeout_s=self.timeout_s,
                memory_limit_mb=int(fields["memory_limit_mb"]), values=self.values,
                start_method=fields["start_method"],
            )

    @staticmethod
    def _options_for(fn: Callable, fields: Mapping[str, Any]) -> dict:
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        options = {k: fields[k] for k in _FORWARDED_FIELDS if k in params and fields.get(k) is not None}
        for key, value in dict(fields.get("options") or {}).items():
            if key not in params and not takes_any:
                raise RewardError(f"reward.options.{key}: reward {fields['name']!r} takes no option {key!r}")
            options[key] = value
        return options

    @property
    def last_latencies_s(self) -> list[float]:
        """Per sample of the last batch: seconds from being handed to a worker (or started inline) to its result."""
        return list(self._pool.last_latencies_s) if self._pool is not None else list(self._inline_latencies_s)

    @property
    def workers_replaced(self) -> int:
        return self._pool.workers_replaced if self._pool is not None else 0

    def score(self, samples: Iterable[Any]) -> list[RewardResult]:
        """One `RewardResult` per sample, in input order. Samples: RewardSample or (response, ground_truth[, metadata])."""
        batch = [as_sample(s) for s in samples]
        if not batch:
            return []
        if self.is_async:
            return score_async(self.fn, batch, self.options, timeout_s=self.timeout_s,
                               max_concurrency=max(1, self.num_workers) * 16, values=self.values)
        if self._pool is not None:
            return self._pool.score(batch)
        if not install_timer():
            raise RewardError("reward num_workers=0: in-process scoring needs the main thread (signal-based time limit)")
        results, self._inline_latencies_s = [], []
        for sample in batch:
            started = time.monotonic()
            results.append(score_one(self.fn, sample, self.options, self.timeout_s, self.values))
            self._inline_latencies_s.append(time.monotonic() - started)
        return results

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> RewardScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


def score_batch(
    name: str,
    responses: Sequence[Any],
    ground_truths: Sequence[Any],
    *,
    timeout_s: float = 5.0,
    metadata: Optional[Sequence[Mapping[str, Any]]] = None,
    **options: Any,
) -> list[RewardResult]:
    """Scores `responses[i]` against `ground_truths[i]` with reward `name`; one result each, in input order.

    `options` are RewardConfig fields (num_workers, memory_limit_mb, correct, ...) or, failing
    that, keyword options of the reward function. Starts and stops a pool: a trainer that scores
    every step should hold a `RewardScorer` instead.
    """
    if len(responses) != len(ground_truths):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(ground_truths)} ground truths")
    if metadata is not None and len(metadata) != len(responses):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(metadata)} metadata entries")
    from maspo_megatron.config.data import RewardConfig

    config_keys = {f for f in vars(RewardConfig())}
    fields = {k: v for k, v in options.items() if k in config_keys}
    fn_options = {k: v for k, v in options.items() if k not in config_keys}
    fields["options"] = {**dict(fields.get("options") or {}), **fn_options}
    if "num_workers" not in fields:
        fields["num_workers"] = min(_default_workers(), max(1, len(responses)))
    metas = metadata if metadata is not None else [{}] * len(responses)
    samples = [RewardSample(r, g, m or {}) for r, g, m in zip(responses, ground_truths, metas, strict=True)]
    with RewardScorer(name=name, timeout_s=timeout_s, **fields) as scorer:
        return scorer.score(samples)
