"""LR schedule (warmup + decay over optimizer steps) and the non-finite gradient guard."""
import math

import torch

from maspo_megatron.config import load_config
from maspo_megatron.trainer.optim import build_scheduler, local_grads_finite, optimizer_steps_per_rl_step


class _FakeOptimizer:
    """What OptimizerParamScheduler touches: param_groups with lr/weight_decay."""

    def __init__(self):
        self.param_groups = [{"lr": 0.0, "weight_decay": 0.0, "params": []}]


def test_warmup_then_cosine_decay_counts_optimizer_steps():
    cfg = load_config(None, ["trainer.lr=1e-3", "trainer.min_lr=1e-4", "trainer.lr_warmup_steps=2",
                             "trainer.lr_decay=cosine", "trainer.total_steps=10", "algorithm.mini_batches=2"])
    assert optimizer_steps_per_rl_step(cfg) == 2
    opt = _FakeOptimizer()
    sched = build_scheduler(cfg, opt)
    lrs = []
    for _ in range(20):
        sched.step(1)
        lrs.append(opt.param_groups[0]["lr"])
    # 2 RL warmup steps = 4 optimizer steps of linear warmup, then cosine from 1e-3 to 1e-4 at step 20.
    assert lrs[:4] == [2.5e-4, 5e-4, 7.5e-4, 1e-3]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False))
    assert math.isclose(lrs[-1], 1e-4, rel_tol=1e-9)


def test_local_grads_finite_sees_nan_and_inf():
    model = torch.nn.Linear(3, 2)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert local_grads_finite([model])
    model.weight.grad[0, 1] = float("nan")
    assert not local_grads_finite([model])
    model.weight.grad.zero_()
    model.bias.main_grad = torch.tensor([0.0, float("inf")])
    assert not local_grads_finite([model])
