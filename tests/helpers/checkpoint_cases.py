"""Multi-process cases for test_trainer_state.py and test_guard.py (module level so that the launcher's children import them)."""
from __future__ import annotations

import os
import zlib

import torch

from maspo_megatron.config import Config, ParallelConfig


def setup_policy(tp: int, distributed_optimizer: bool = True):
    from maspo_megatron.parallel.state import init_distributed
    from maspo_megatron.trainer.optim import build_optimizer, build_scheduler
    from tests.helpers.tiny_gpt import build_tiny_gpt, wrap_ddp

    cfg = Config()
    cfg.parallel = ParallelConfig(tp=tp, distributed_optimizer=distributed_optimizer)
    cfg.trainer.lr = 1e-2
    cfg.trainer.lr_warmup_steps = 2
    cfg.trainer.lr_decay = "cosine"
    cfg.trainer.total_steps = 10
    dims = init_distributed(cfg.parallel, seed=5)
    chunks = wrap_ddp(build_tiny_gpt(dims, num_layers=2), distributed_optimizer=distributed_optimizer)
    optimizer = build_optimizer(cfg, chunks)
    scheduler = build_scheduler(cfg, optimizer)
    return dims, chunks, optimizer, scheduler


def fake_grad_step(chunks, optimizer, scheduler, step: int) -> None:
    """Deterministic per-(name, step) gradients, identical on every DP rank, then one optimizer step."""
    from tests.helpers.tiny_gpt import named_local_params

    for chunk in chunks:
        chunk.zero_grad_buffer()
    for name, param in named_local_params(chunks):
        gen = torch.Generator().manual_seed(zlib.crc32(f"{name}:{step}".encode()))
        param.main_grad.copy_(torch.randn(param.shape, generator=gen))
    optimizer.step()
    scheduler.step(1)


def params_of(chunks) -> dict:
    from tests.helpers.tiny_gpt import named_local_params

    return {name: p.detach().clone() for name, p in named_local_params(chunks)}


def save_then_continue(output_dir: str, tp: int, steps_before: int, steps_after: int, kill_mode: str | None = None):
    """Trains `steps_before`, saves, (optionally dies while saving step 2), trains `steps_after` more."""
    from maspo_megatron.checkpoint import trainer_state as checkpoint

    dims, chunks, optimizer, scheduler = setup_policy(tp)
    for step in range(1, steps_before + 1):
        fake_grad_step(chunks, optimizer, scheduler, step)
    torch.manual_seed(77)  # an RNG state that the checkpoint must carry
    checkpoint.save_checkpoint(output_dir, steps_before, chunks, optimizer, scheduler,
                               {"step": steps_before, "sampler": {"epoch": 0, "offset": 3}}, keep_last=2)
    rng_probe = torch.rand(3)
    if kill_mode is not None:
        fake_grad_step(chunks, optimizer, scheduler, steps_before + 1)
        real_save = checkpoint.dist_checkpointing.save

        def dying_save(state, path, **kwargs):
            if kill_mode == "after_data":
                real_save(state, path, **kwargs)
            os._exit(9)  # as if SIGKILLed mid-checkpoint

        checkpoint.dist_checkpointing.save = dying_save
        checkpoint.save_checkpoint(output_dir, steps_before + 1, chunks, optimizer, scheduler, {"step": steps_before + 1})
    for step in range(steps_before + 1, steps_before + steps_after + 1):
        fake_grad_step(chunks, optimizer, scheduler, step)
    return {"params": params_of(chunks), "rng_probe": rng_probe, "lr": optimizer.param_groups[0]["lr"]}


def resume_and_continue(output_dir: str, tp: int, steps_after: int):
    from maspo_megatron.checkpoint import trainer_state as checkpoint

    dims, chunks, optimizer, scheduler = setup_policy(tp)
    latest = checkpoint.find_latest(checkpoint.checkpoint_root(output_dir))
    driver = checkpoint.load_checkpoint(latest, chunks, optimizer, scheduler)
    rng_probe = torch.rand(3)
    start = driver["step"]
    for step in range(start + 1, start + steps_after + 1):
        fake_grad_step(chunks, optimizer, scheduler, step)
    return {"params": params_of(chunks), "rng_probe": rng_probe, "driver": driver, "latest": latest.name,
            "lr": optimizer.param_groups[0]["lr"]}
