"""Optimisation, schedule, checkpoints, evaluation and logging."""
from __future__ import annotations

import dataclasses
from typing import Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"
    seed: int = option(1234, ge=0)
    total_steps: int = option(100, ge=1)
    prompts_per_step: int = option(16, ge=1, help="prompts per RL step (global, before n samples each)")
    micro_batch_tokens: int = option(4096, ge=1, help="token budget of one packed micro-batch")
    lr: float = option(1e-6, gt=0)
    min_lr: float = option(0.0, ge=0)
    lr_warmup_steps: int = option(0, ge=0)
    lr_decay: str = option("constant", choices=("constant", "linear", "cosine"))
    weight_decay: float = option(0.0, ge=0)
    adam_beta1: float = option(0.9, ge=0, lt=1)
    adam_beta2: float = option(0.999, ge=0, lt=1)
    adam_eps: float = option(1e-8, gt=0)
    grad_clip: float = option(1.0, ge=0, help="0 disables clipping")
    save_every: int = option(0, ge=0, help="checkpoint every k steps (0: only at the end)")
    keep_last: int = option(2, ge=1)
    resume: bool = option(True, help="resume from <output_dir>/checkpoints/latest when present")
    hf_export_every: int = option(0, ge=0, help="also export a HF checkpoint to <output_dir>/hf_step_<N> every k steps (0: never)")
    eval_every: int = option(0, ge=0, help="evaluate every k steps (0: only at the end)")
    eval_n_samples: int = option(4, ge=1, help="samples per validation prompt: Avg@n and Pass@n")
    eval_greedy: bool = option(False, help="greedy decoding for evaluation (then n is forced to 1)")
    eval_temperature: Optional[float] = option(None, gt=0, help="evaluation temperature (default: rollout.temperature)")
    eval_top_p: Optional[float] = option(None, gt=0, le=1, help="evaluation top-p (default: rollout.top_p)")
    eval_max_prompts: Optional[int] = option(None, ge=1, help="cap on prompts per validation set (default: all)")
    eval_at_end: bool = option(True, help="evaluate after the last step")
    hf_export_at_end: bool = option(True, help="write a HF checkpoint to <output_dir>/hf after the last step")
    sft_warmup_steps: int = option(0, ge=0, help="supervised warm-up steps on the task's reference answers before RL (synthetic task only)")
    sft_batch_size: int = option(32, ge=1, help="prompts per supervised warm-up step")
    sft_lr: float = option(1e-3, gt=0, help="learning rate of the supervised warm-up (constant)")
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    log_every: int = option(1, ge=1)

    def validate(self) -> None:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr: {self.min_lr} must be <= lr ({self.lr})")
