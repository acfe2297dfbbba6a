"""Megatron optimizer (distributed by default), LR warmup/decay, and the non-finite-gradient guard.

One optimizer step per mini-batch: an RL step makes `ppo_epochs * mini_batches` of them, and the
LR schedule counts optimizer steps (what Megatron's OptimizerParamScheduler expects).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from maspo_megatron.config import Config

# Our names -> Megatron's OptimizerParamScheduler decay styles.
_DECAY_STYLES = {"constant": "constant", "linear": "linear", "cosine": "cosine"}


def optimizer_steps_per_rl_step(cfg: Config) -> int:
    return cfg.algorithm.ppo_epochs * cfg.algorithm.mini_batches


def build_optimizer(cfg: Config, model_chunks: Sequence[torch.nn.Module]):
    """Adam through Megatron's `get_megatron_optimizer` (fp32 main params, grad clipping).

    The schedule scales the loss with the model config's `grad_scale_func`, as Megatron's own
    training setup wires it: with fp16 that is the dynamic loss scale (without it, fp16 gradients
    underflow and the scaler's unscale divides unscaled gradients); with bf16/fp32 the scale is 1.
    """
    trainer = cfg.trainer
    dtype = cfg.model.dtype
    opt_cfg = OptimizerConfig(
        optimizer="adam",
        lr=trainer.lr,
        min_lr=trainer.min_lr,
        weight_decay=trainer.weight_decay,
        adam_beta1=trainer.adam_beta1,
        adam_beta2=trainer.adam_beta2,
        adam_eps=trainer.adam_eps,
        clip_grad=trainer.grad_clip,
        bf16=dtype == "bf16",
        fp16=dtype == "fp16",
        params_dtype={"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype],
        use_distributed_optimizer=cfg.parallel.distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(opt_cfg, list(model_chunks))
    for chunk in model_chunks:
        chunk.config.grad_scale_func = optimizer.scale_loss
    return optimizer


def build_scheduler(cfg: Config, optimizer) -> OptimizerParamScheduler:
    """Linear warmup from 0 over `lr_warmup_steps` RL steps, then the decay style down to min_lr."""
    trainer = cfg.trainer
    per_step = optimizer_steps_per_rl_step(cfg)
    total = trainer.total_steps * per_step
    warmup = min(trainer.lr_warmup_steps * per_step, total - 1)
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if warmup > 0 else trainer.lr,
        max_lr=trainer.lr,
        min_lr=trainer.min_lr if trainer.lr_decay != "constant" else trainer.lr,
        lr_warmup_steps=warmup,
        lr_decay_steps=total,
        lr_decay_style=_DECAY_STYLES[trainer.lr_decay],
        start_wd=trainer.weight_decay,
        end_wd=trainer.weight_decay,
        wd_incr_steps=total,
        wd_incr_style="constant",
        # The checkpoint's schedule wins on resume (so a resumed run follows the same curve).
        use_checkpoint_opt_param_scheduler=True,
        override_opt_param_scheduler=False,
    )


def current_lr(optimizer) -> float:
    return float(optimizer.param_groups[0]["lr"])


def local_grads_finite(model_chunks: List[torch.nn.Module]) -> bool:
    """True when every gradient this rank holds (DDP main_grad buffers after reduction) is finite.

    A non-finite value anywhere in the global gradient appears in some rank's local buffer (the
    rank that produced it, and the owner of the reduced shard), so a MAX all-reduce of
    `not local_grads_finite` over the world decides "skip this optimizer step" for all ranks.
    fp32 Megatron optimizers have no grad scaler and would otherwise apply NaN updates.
    """
    for chunk in model_chunks:
        buffers = getattr(chunk, "buffers", None)  # Megatron DDP: list of param-and-grad buffers
        if isinstance(buffers, list) and buffers and all(hasattr(b, "grad_data") for b in buffers):
            for buffer in buffers:
                if not torch.isfinite(buffer.grad_data).all():
                    return False
            continue
        for param in chunk.parameters():
            grad = getattr(param, "main_grad", None)
            if grad is None:
                grad = param.grad
            if grad is not None and not torch.isfinite(grad).all():
                return False
    return True


def all_grads_finite(model_chunks: List[torch.nn.Module]) -> bool:
    """`local_grads_finite` agreed on by all ranks (a collective when distributed)."""
    # A host tensor: on a GPU node it travels over the gloo half of the default group.
    bad = torch.tensor([0 if local_grads_finite(model_chunks) else 1], dtype=torch.int32, device="cpu")
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return not bool(bad.item())
