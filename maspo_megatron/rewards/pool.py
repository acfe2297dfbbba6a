"""A pool of reward worker processes with limits enforced from outside.

The driver scores every RL step, so workers start once and are reused. Each sample has a
deadline: the worker's own timer (worker.py) answers "timeout" at `timeout_s`; a worker still busy
at `timeout_s + kill_grace_s` (stuck in C code, or ignoring signals) is killed with SIGKILL and
replaced, and its sample scores "timeout". A worker whose resident memory exceeds
`memory_limit_mb` is killed the same way ("error: memory limit"). The batch goes on meanwhile;
results come back in input order.

Each worker has at most one sample running and one queued behind it (while the batch has more
samples left than workers); a killed worker's queued sample goes back to the front of the queue.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import sys
import time
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Mapping, Optional, Sequence

from maspo_megatron.rewards.result import RewardResult, RewardSample

_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_POLL_S = 0.02  # how often busy workers' memory and deadlines are checked while waiting
# One sample may wait in a busy worker's pipe so the worker never idles while the driver wakes up
# to hand out the next (on an oversubscribed machine that wake-up costs tens of ms per sample).
# Only small ones: a pipe holds 64 KiB, and a send into a full pipe of a stuck worker would block
# the driver, deadlines and all.
_PREFETCH_BYTES = 32 * 1024


def resident_bytes(pid: int) -> int:
    """Resident set size of `pid` from /proc (0 if it is gone or /proc is unavailable)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return 0


def _reference(fn: Callable) -> Callable | str:
    """"module:qualname" for an importable function (the worker imports it with the driver's
    sys.path, which a forkserver started earlier by someone else would not have), else `fn`."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    found: Any = sys.modules.get(module) if module and module != "__main__" else None
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"{module}:{qualname}" if found is fn else fn


class _Worker:
    def __init__(self, ctx, fn: Callable, options: Mapping[str, Any], timeout_s: float, values: Mapping[str, float]):
        from maspo_megatron.rewards.worker import worker_main

        self.conn, child_conn = ctx.Pipe(duplex=True)
        args = (child_conn, _reference(fn), list(sys.path), options, timeout_s, values)
        self.process = ctx.Process(target=worker_main, args=args, daemon=True)
        self.process.start()
        child_conn.close()
        self.ready = False
        self.inflight: deque[int] = deque()  # sample indices sent, in order; inflight[0] is running
        self.started_at = 0.0  # when inflight[0] started
        self.spawned_at = time.monotonic()

    def send(self, index: int, payload: bytes, now: float) -> None:
        self.conn.send_bytes(payload)
        if not self.inflight:
            self.started_at = now
        self.inflight.append(index)

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)
        self.conn.close()


class WorkerPool:
    """Scores samples with a sync reward function in `num_workers` processes. Call `close()` (or use `with`)."""

    def __init__(
        self,
        fn: Callable,
        options: Mapping[str, Any],
        *,
        num_workers: int,
        timeout_s: float,
        memory_limit_mb: int,
        values: Mapping[str, float],
        start_method: str = "forkserver",
        kill_grace_s: float = 0.5,
        startup_timeout_s: float = 60.0,
    ):
        if num_workers < 1:
            raise ValueError(f"num_workers: {num_workers} must be >= 1 for a worker pool")
        self.fn, self.options, self.values = fn, dict(options), dict(values)
        self.timeout_s, self.kill_grace_s, self.startup_timeout_s = timeout_s, kill_grace_s, startup_timeout_s
        self.memory_limit_bytes = memory_limit_mb * 1024 * 1024
        self.ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Workers then fork from a server that already imported math-verify: a killed worker's
            # replacement is ready in milliseconds instead of a full interpreter start.
            self.ctx.set_forkserver_preload(["maspo_megatron.rewards.math_reward"])
        self.workers_replaced = 0
        self.last_latencies_s: list[float] = []  # per sample of the last batch: start of scoring -> result
        self._started_at: list[float] = []
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        try:
            return _Worker(self.ctx, self.fn, self.options, self.timeout_s, self.values)
        except (AttributeError, TypeError, pickle.PicklingError) as exc:  # pickling a lambda / local function
            from maspo_megatron.rewards.registry import RewardError

            raise RewardError(f"reward {getattr(self.fn, '__qualname__', self.fn)!r}: cannot be sent to a worker process ({exc}); define it at module level") from None

    @property
    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def _replace(self, worker: _Worker, queue: deque) -> None:
        """Kills `worker`, puts its not-yet-started samples back at the front of `queue`, starts a new one."""
        queue.extendleft(reversed(list(worker.inflight)[1:]))
        worker.inflight.clear()
        worker.kill()
        self._workers[self._workers.index(worker)] = self._spawn()
        self.workers_replaced += 1

    def score(self, samples: Sequence[RewardSample]) -> list[RewardResult]:
        results: list[Optional[RewardResult]] = [None] * len(samples)
        self._started_at = [0.0] * len(samples)
        self.last_latencies_s = [0.0] * len(samples)
        payloads: dict[int, bytes] = {}
        queue = deque(range(len(samples)))
        remaining = len(samples)
        while remaining:
            remaining -= self._dispatch(samples, queue, payloads, results)
            remaining -= self._collect(results, queue)
            remaining -= self._enforce_limits(results, queue)
            if remaining and not queue and not any(w.inflight for w in self._workers):
                raise RuntimeError(f"reward pool: {remaining} samples neither queued nor in a worker (a bug; please report)")
        return results  # type: ignore[return-value]

    def _dispatch(self, samples: Sequence[RewardSample], queue: deque, payloads: dict, results: list) -> int:
        """Hands out samples; returns how many finished (a worker found dead on send: its running sample)."""
        finished = 0
        for depth in (0, 1):  # first every idle worker, then one queued sample per busy worker
            for worker in list(self._workers):
                if not (queue and worker.ready and len(worker.inflight) == depth):
                    continue
                if depth == 1 and len(queue) < len(self._workers):
                    continue  # near the end of the batch a queued sample could wait behind a slow one
                index = queue[0]
                if index not in payloads:
                    payloads[index] = pickle.dumps((index, samples[index]), protocol=pickle.HIGHEST_PROTOCOL)
                if depth == 1 and len(payloads[index]) > _PREFETCH_BYTES:
                    continue
                queue.popleft()
                now = time.monotonic()
                try:
                    worker.send(index, payloads.pop(index), now)
                except (BrokenPipeError, OSError):  # it died since the last look
                    queue.appendleft(index)
                    finished += self._worker_died(worker, results, queue)
                    continue
                if depth == 0:
                    self._started_at[index] = now
        return finished

    def _finish(self, results: list, index: int, result: RewardResult, finished_at: Optional[float] = None) -> None:
        results[index] = result
        self.last_latencies_s[index] = (finished_at or time.monotonic()) - self._started_at[index]

    def _collect(self, results: list, queue: deque) -> int:
        """Waits briefly for worker messages; stores results. Returns how many samples finished."""
        finished = 0
        conns = {w.conn: w for w in self._workers}
        for conn in wait(list(conns), timeout=_POLL_S):
            worker = conns[conn]
            try:
                index, reward, reason, finished_at = conn.recv()
            except (EOFError, OSError):
                finished += self._worker_died(worker, results, queue)
                continue
            if index == "ready":
                worker.ready = True
            elif worker.inflight and index == worker.inflight[0]:
                worker.inflight.popleft()
                self._finish(results, index, RewardResult(float(reward), reason), finished_at)
                finished += 1
                if worker.inflight:  # the queued sample started the moment this one finished
                    worker.started_at = finished_at
                    self._started_at[worker.inflight[0]] = finished_at
        return finished

    def _worker_died(self, worker: _Worker, results: list, queue: deque) -> int:
        worker.process.join(timeout=1)
        code = worker.process.exitcode
        if not worker.ready:
            raise RuntimeError(f"reward worker failed to start (exit code {code}); is the reward function importable?")
        running = worker.inflight[0] if worker.inflight else None
        self._replace(worker, queue)
        if running is None:
            return 0
        self._finish(results, running, RewardResult.make(self.values["error"], f"error: worker died (exit code {code})"))
        return 1

    def _enforce_limits(self, results: list, queue: deque) -> int:
        finished = 0
        now = time.monotonic()
        for worker in list(self._workers):
            if not worker.ready and now - worker.spawned_at > self.startup_timeout_s:
                raise RuntimeError(f"reward worker not ready after {self.startup_timeout_s:.0f} s")
            if not worker.inflight or worker.conn.poll(0):
                continue  # idle, or a result is waiting to be read: read it before judging
            running = worker.inflight[0]
            if now - worker.started_at > self.timeout_s + self.kill_grace_s:
                result = RewardResult.make(self.values["timed_out"], "timeout")
            elif resident_bytes(worker.process.pid) > self.memory_limit_bytes:
                result = RewardResult.make(self.values["error"], "error: memory limit exceeded (worker killed)")
            else:
                continue
            self._finish(results, running, result)
            self._replace(worker, queue)
            finished += 1
        return finished

    def close(self) -> None:
        for worker in self._workers:
            try:
                worker.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            worker.kill()
        self._workers = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
