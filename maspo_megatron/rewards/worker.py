"""Scoring one sample under a deadline, and the worker process loop around it.

Inside a worker the deadline is a soft one: `signal.setitimer` in the worker's main thread raises
`SampleTimeout` (a BaseException, so a reward's `except Exception` cannot swallow it). Code stuck
in C (a huge bignum power) never sees that signal, so the pool (pool.py) also kills a worker from
outside once the deadline plus a grace period has passed; this module is the cheap path.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Mapping

from maspo_megatron.rewards.result import RewardResult, RewardSample, to_result


class SampleTimeout(BaseException):
    """Raised by the per-sample timer inside the scoring thread."""


def _on_alarm(signum, frame):
    raise SampleTimeout()


def install_timer() -> bool:
    """Arms SIGALRM for `score_one`; returns False off the main thread, where no signal can be used."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGALRM, _on_alarm)
    return True


def score_one(
    fn: Callable, sample: RewardSample, options: Mapping[str, Any], timeout_s: float | None, values: Mapping[str, float]
) -> RewardResult:
    """Calls `fn` on one sample; `timeout_s` needs `install_timer()` to have succeeded (else None)."""
    try:
        try:
            if timeout_s is not None:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
            value = fn(sample.response, sample.ground_truth, sample.metadata, **options)
        finally:
            if timeout_s is not None:
                signal.setitimer(signal.ITIMER_REAL, 0)
        return to_result(value)
    except SampleTimeout:
        return RewardResult.make(values["timed_out"], "timeout")
    except MemoryError:
        return RewardResult.make(values["error"], "error: out of memory")
    except RecursionError:
        return RewardResult.make(values["error"], "error: recursion too deep")
    except Exception as exc:  # an untrusted sample must not take the batch down
        return RewardResult.make(values["error"], f"error: {type(exc).__name__}: {_safe_str(exc)}")


def _safe_str(exc: BaseException) -> str:
    # str() of an exception built from a sympy object can itself be slow or fail: bound it.
    try:
        return str(exc)[:120]
    except BaseException:
        return "(unprintable)"


def resolve_in_worker(fn: Callable | str, sys_path: list[str]) -> Callable:
    """The reward function: given as "module:qualname" (imported here, with the driver's sys.path
    appended, so it works whichever way the worker was started) or as the function itself."""
    if not isinstance(fn, str):
        return fn
    for entry in sys_path:
        if entry not in sys.path:
            sys.path.append(entry)
    from maspo_megatron.rewards.registry import get_reward

    return get_reward(fn)


def worker_main(conn, fn: Callable | str, sys_path: list[str], options: Mapping[str, Any], timeout_s: float,
                values: Mapping[str, float]) -> None:
    """Worker process: "ready", then for each (index, sample) received, in order, send
    (index, reward, reason, finished_at) with `time.monotonic()` (one clock for all processes on
    Linux: the driver learns when the next queued sample started without asking)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it then closes us
    fn = resolve_in_worker(fn, sys_path)
    install_timer()
    warm_up = getattr(fn, "warm_up", None)
    if callable(warm_up):
        warm_up()
    try:
        conn.send(("ready", None, None, time.monotonic()))
    except (BrokenPipeError, EOFError):
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        index, sample = message
        result = score_one(fn, sample, options, timeout_s, values)
        try:
            conn.send((index, result.reward, result.reason, time.monotonic()))
        except (BrokenPipeError, OSError):
            return
        except Exception:
            conn.send((index, values["error"], "error: result not picklable: " + traceback.format_exc(limit=1)[-100:], time.monotonic()))
