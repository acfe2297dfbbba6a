"""The model inside Megatron's wrappers.

A trainer chunk is `DistributedDataParallel(Float16Module(GPTModel))` (Float16Module only in
bf16/fp16, DDP only for trainable policies). Every wrapper keeps the wrapped module in `.module`
and shares its parameters (Float16Module casts them in place), and Float16Module forwards
`sharded_state_dict` / `load_state_dict` unchanged, so parameter names, sharded keys and state
dicts are read from the innermost module everywhere.
"""
from __future__ import annotations

import torch


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers (a bare model is returned as it is)."""
    while isinstance(getattr(chunk, "module", None), torch.nn.Module):
        chunk = chunk.module
    return chunk
