"""Parallel layout. The data-parallel size is derived: world_size / (tp * pp * cp)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class ParallelConfig:
    tp: int = option(1, ge=1, help="tensor-parallel size")
    pp: int = option(1, ge=1, help="pipeline-parallel size")
    vpp: Optional[int] = option(None, ge=2, help="virtual pipeline stages per rank (interleaved schedule)")
    cp: int = option(1, ge=1, help="context-parallel size (needs Transformer Engine)")
    ep: int = option(1, ge=1, le=1, help="expert parallel: reserved, dense models only for now")
    sequence_parallel: bool = option(False, help="Megatron sequence parallel (needs tp > 1)")
    distributed_optimizer: bool = True
    backend: str = option("auto", choices=("auto", "nccl", "gloo"),
                          help="auto: cpu:gloo,cuda:nccl with CUDA (CPU control tensors over gloo), gloo without")
    timeout_s: float = option(3600.0, gt=0, help="process-group timeout: must outlast the longest phase in which "
                              "only rank 0 works (rollout + rewards, evaluation, HF export, SGLang start-up)")

    def validate(self) -> None:
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel: needs tp > 1")
        if self.vpp is not None and self.pp == 1:
            raise ValueError("vpp: needs pp > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp
