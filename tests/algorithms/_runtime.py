"""Runtime tensor inputs that some losses require besides the four common ones (none is config)."""
from __future__ import annotations

import torch

from maspo_megatron.algorithms import loss_spec


def runtime_inputs(name: str, log_prob: torch.Tensor) -> dict:
    """A loss that asks for the policy entropy gets a deterministic one in [0, 3) of log_prob's shape and device
    (the other inputs have defaults computed from the tensors given)."""
    if "entropy" not in loss_spec(name).inputs:
        return {}
    steps = torch.arange(log_prob.numel(), device=log_prob.device, dtype=torch.float32).reshape(log_prob.shape)
    return {"entropy": (steps * 0.37) % 3.0}
