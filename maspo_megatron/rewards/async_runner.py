"""Async rewards (e.g. a remote verifier over HTTP): run concurrently in the calling process.

The work happens elsewhere (a server), so process isolation buys nothing; a per-sample
`asyncio.wait_for` bounds each call. The event loop runs in a helper thread so this also works
when the caller already has a running loop.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Callable, Mapping, Sequence

from maspo_megatron.rewards.result import RewardResult, RewardSample, to_result


def score_async(
    fn: Callable,
    samples: Sequence[RewardSample],
    options: Mapping[str, Any],
    *,
    timeout_s: float,
    max_concurrency: int,
    values: Mapping[str, float],
) -> list[RewardResult]:
    """Scores every sample with coroutine function `fn`, at most `max_concurrency` at a time, in input order."""

    async def run_all() -> list[RewardResult]:
        limit = asyncio.Semaphore(max_concurrency)

        async def one(sample: RewardSample) -> RewardResult:
            async with limit:
                try:
                    value = await asyncio.wait_for(fn(sample.response, sample.ground_truth, sample.metadata, **options), timeout_s)
                    return to_result(value)
                except asyncio.TimeoutError:
                    return RewardResult.make(values["timed_out"], "timeout")
                except Exception as exc:
                    return RewardResult.make(values["error"], f"error: {type(exc).__name__}: {str(exc)[:120]}")

        return list(await asyncio.gather(*(one(s) for s in samples)))

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["results"] = asyncio.run(run_all())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="async-reward", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["results"]
