"""Parallel setup from `cfg.parallel`, and ONE object that answers "which group / rank / size".

    dims = init_distributed(cfg.parallel, seed=cfg.trainer.seed)
    if dims.is_last_stage: ...
    torch.distributed.all_reduce(x, group=dims.dp_group)
    destroy_distributed()

Rank order is Megatron's default "tp-cp-ep-dp-pp": TP ranks are adjacent, PP is the outermost
axis. The data-parallel size is derived: world_size / (tp * pp * cp).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import random
from typing import Optional

import torch
import torch.distributed as dist

from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.parallel.device import process_group_backend, select_device
from maspo_megatron.parallel.launch_env import rank_env


@dataclasses.dataclass(frozen=True)
class ParallelDims:
    """The single source of truth for the parallel layout of this process.

    Sizes: tp, pp, cp, dp (derived), vpp (None or virtual stages per rank), world_size.
    Ranks: rank (global), tp_rank, pp_rank, cp_rank, dp_rank.
    local_rank: this process's rank on its node (LOCAL_RANK / SLURM_LOCALID).
    device: where this rank computes (cuda:<local rank> on a GPU node, cpu without CUDA; decided
    once in `parallel/device.py`): model chunks, micro-batches and loss tensors live there.
    Groups (torch.distributed ProcessGroup): tp_group, pp_group, cp_group, dp_group (without CP),
    dp_cp_group (DP x CP: where gradients are reduced), mp_group (TP x PP), tp_cp_group.
    """

    world_size: int
    rank: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: Optional[int]
    tp_rank: int
    pp_rank: int
    cp_rank: int
    dp_rank: int
    sequence_parallel: bool
    device: torch.device = torch.device("cpu")
    local_rank: int = 0

    @classmethod
    def from_megatron(cls, parallel_cfg: ParallelConfig, device: torch.device, local_rank: int = 0) -> ParallelDims:
        """Reads sizes and ranks from Megatron's initialised parallel_state."""
        from megatron.core import parallel_state as ps

        return cls(
            world_size=dist.get_world_size(),
            rank=dist.get_rank(),
            tp=ps.get_tensor_model_parallel_world_size(),
            pp=ps.get_pipeline_model_parallel_world_size(),
            cp=ps.get_context_parallel_world_size(),
            dp=ps.get_data_parallel_world_size(),
            vpp=parallel_cfg.vpp,
            tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            cp_rank=ps.get_context_parallel_rank(),
            dp_rank=ps.get_data_parallel_rank(),
            sequence_parallel=parallel_cfg.sequence_parallel,
            device=device,
            local_rank=local_rank,
        )

    # Groups are looked up in Megatron's parallel_state every time (never cached here), so a
    # ParallelDims never holds a group that destroy_distributed() has torn down.
    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=False)

    @property
    def dp_cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def mp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_model_parallel_group()

    @property
    def tp_cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_and_context_parallel_group()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def pp_last_global_rank(self) -> int:
        """Global rank of the last PP stage in this rank's pipeline (where losses/metrics live)."""
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_last_rank()

    @property
    def is_metrics_root(self) -> bool:
        """True on global rank 0 (where reduced metrics are reported)."""
        return self.rank == 0

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: tp {self.tp_rank}/{self.tp} pp {self.pp_rank}/{self.pp} "
                f"cp {self.cp_rank}/{self.cp} dp {self.dp_rank}/{self.dp}" + (f" vpp {self.vpp}" if self.vpp else "")
                + f" on {self.device}")


_DIMS: Optional[ParallelDims] = None


def check_layout(parallel_cfg: ParallelConfig, world_size: int) -> int:
    """Returns the derived DP size, or raises ValueError naming the parallel.* keys at fault."""
    parallel_cfg.validate()
    model_parallel = parallel_cfg.model_parallel_size
    if world_size % model_parallel:
        raise ValueError(
            f"parallel: world size {world_size} is not divisible by tp*pp*cp = "
            f"{parallel_cfg.tp}*{parallel_cfg.pp}*{parallel_cfg.cp} = {model_parallel}")
    return world_size // model_parallel


def init_distributed(parallel_cfg: ParallelConfig, seed: int) -> ParallelDims:
    """torch.distributed + Megatron parallel_state + RNG seeding; returns this rank's ParallelDims.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (torchrun) or SLURM_PROCID/SLURM_NTASKS (srun;
    MASTER_ADDR/MASTER_PORT must then be exported by the launch script). Without either it runs
    as a single process (world size 1, MASTER_ADDR/PORT default to localhost:29500).
    Device and backend are decided once (`parallel/device.py`): cuda:<local rank> with a
    `cpu:gloo,cuda:nccl` default group on a GPU node; cpu, gloo and the CPU edge without CUDA.
    The group timeout is `parallel.timeout_s`: it must outlast the longest phase in which only
    rank 0 works (rollout + rewards, evaluation, HF export, SGLang start-up) while the others wait
    in a collective. Idempotent when already initialised with the same layout.
    """
    global _DIMS
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    env = rank_env()
    rank, world_size, local_rank = env.rank, env.world_size, env.local_rank
    check_layout(parallel_cfg, world_size)
    device = select_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        dist.init_process_group(
            backend=process_group_backend(parallel_cfg.backend, device), rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=parallel_cfg.timeout_s))
    if ps.model_parallel_is_initialized():
        if _DIMS is not None and (_DIMS.tp, _DIMS.pp, _DIMS.cp) == (parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.cp):
            return _DIMS
        raise RuntimeError("init_distributed: Megatron parallel state already initialised with another layout; "
                           "call destroy_distributed() first")
    ps.initialize_model_parallel(
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp,
        context_parallel_size=parallel_cfg.cp,
        expert_model_parallel_size=parallel_cfg.ep,
    )
    # Same seed on every rank for Python/CPU RNGs (data order); Megatron derives per-TP-rank
    # streams for model-parallel regions from it (model_parallel_cuda_manual_seed).
    random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    _DIMS = ParallelDims.from_megatron(parallel_cfg, device, local_rank)
    return _DIMS


def get_parallel_dims() -> ParallelDims:
    """The ParallelDims of the last init_distributed() (raises if there was none)."""
    if _DIMS is None:
        raise RuntimeError("parallel state is not initialised: call init_distributed(cfg.parallel, seed) first")
    return _DIMS


def destroy_distributed(keep_process_group: bool = False) -> None:
    """Tears down Megatron's parallel_state and the default process group (safe to call twice).

    keep_process_group=True keeps torch.distributed's default group, so that init_distributed can
    set up another layout in the same processes (re-creating the default group on the same
    MASTER_PORT right away can hang while the old TCP store is still shutting down).
    """
    global _DIMS
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized() and not keep_process_group:
        dist.destroy_process_group()
    _DIMS = None
