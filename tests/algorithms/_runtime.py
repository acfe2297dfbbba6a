"""Runtime tensor inputs that some losses require besides the four common ones (none is config)."""
from __future__ import annotations

import torch

RUNTIME_KEYS = ("seq_log_ratio", "entropy", "contribution_sums")


def runtime_inputs(name: str, log_prob: torch.Tensor) -> dict:
    """entropy_adv needs the policy entropy: a deterministic one in [0, 3) of log_prob's shape and device."""
    if name != "entropy_adv":
        return {}
    steps = torch.arange(log_prob.numel(), device=log_prob.device, dtype=torch.float32).reshape(log_prob.shape)
    return {"entropy": (steps * 0.37) % 3.0}
