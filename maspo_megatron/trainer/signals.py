"""Graceful stop on SIGUSR1 / SIGTERM: finish the current step, checkpoint, exit with code 75.

SLURM (`--signal=B:USR1@N`, `scancel --signal=USR1`) and torchrun (SIGTERM on shutdown) deliver the
signal to some or all ranks at slightly different moments. The handler only sets a flag; the
loop asks `should_stop()` once per step, which all-reduces the flag (MAX) so that every rank takes
the same decision at the same step (a rank that stopped alone would hang the others in a
collective).
"""
from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

import torch

# EX_TEMPFAIL from sysexits.h: "try again later". Launchers requeue a job that exits with it.
EXIT_CODE_REQUEUE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Installs handlers for `STOP_SIGNALS`; restores the previous ones on `close()`."""

    def __init__(self) -> None:
        self.signal_name: Optional[str] = None
        self._previous: dict = {}
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): polling still works
                pass

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # Only record: the step in flight finishes and the checkpoint is written by the loop.
        self.signal_name = signal.Signals(signum).name

    @property
    def requested_locally(self) -> bool:
        return self.signal_name is not None

    def should_stop(self, group: Optional[torch.distributed.ProcessGroup] = None) -> bool:
        """True on every rank if ANY rank received a stop signal (a collective when distributed)."""
        # A host tensor: on a GPU node it travels over the gloo half of the default group.
        flag = torch.tensor([1 if self.requested_locally else 0], dtype=torch.int32, device="cpu")
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group)
        return bool(flag.item())

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
