"""The policy-loss registry and its one public entry point, `policy_loss`.

A loss is a plain function chosen by name from config:

    loss_tok, metrics = fn(log_prob, old_log_prob, advantages, mask, **hyper)

registered with `@register_policy_loss("name")`. Its hyperparameters are its keyword-only
parameters, whose defaults must equal the config dataclass of the same name
(maspo_megatron/config/algorithm.py), so `policy_loss(cfg.algorithm.loss, ..., **cfg.algorithm.loss_hyper())`
works. `policy_loss` does everything the losses share: shape checks, the upcast to (at least)
fp32, detaching the old log-probs and advantages, neutralising masked positions (so padding
holding -inf or NaN cannot leak into values or gradients), and zeroing the result there.
"""
from __future__ import annotations

import functools
import inspect
from typing import Callable

import torch

PolicyLossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

# name -> loss function. Read-only for callers: add entries through register_policy_loss.
POLICY_LOSSES: dict[str, PolicyLossFn] = {}


def register_policy_loss(name: str, *, replace: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering `fn(log_prob, old_log_prob, advantages, mask, *, hyper...)` under `name`.

    The function receives prepared tensors (same shape, compute dtype >= fp32, masked positions
    set to 0, old_log_prob/advantages detached, mask bool) and returns `(loss_tok, metrics)`.
    """

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in POLICY_LOSSES and not replace:
            raise ValueError(f"policy loss {name!r} is already registered (pass replace=True to override)")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 4 or any(p.kind is p.VAR_KEYWORD for p in params):
            raise TypeError(
                f"policy loss {name!r}: expected fn(log_prob, old_log_prob, advantages, mask, *, hyper=default, ...)"
            )
        POLICY_LOSSES[name] = fn
        return fn

    return decorator


def loss_hyperparameters(name: str) -> dict:
    """The hyperparameters a registered loss accepts, with their defaults: {key: default}."""
    return dict(_keyword_defaults(_lookup(name)))


@functools.cache
def _keyword_defaults(fn: PolicyLossFn) -> dict:
    # cached: policy_loss checks the keys on every micro-batch
    return {p.name: p.default for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY}


def _lookup(name: str) -> PolicyLossFn:
    try:
        return POLICY_LOSSES[name]
    except KeyError:
        raise ValueError(f"policy_loss: unknown loss {name!r} (registered: {sorted(POLICY_LOSSES)})") from None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for bf16/fp16/fp32 inputs, fp64 for fp64 (so float64 finite-difference checks are exact)."""
    return torch.promote_types(dtype, torch.float32)


def policy_loss(
    name: str,
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    **hyper,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss of the registered loss `name`.

    Args:
        log_prob[B, T]: current-policy log-probs of the response tokens (carries the gradient).
        old_log_prob[B, T]: behaviour-policy log-probs (treated as constants).
        advantages[B, T]: advantages broadcast per token (treated as constants).
        mask[B, T]: bool or 0/1; True where the token is a response token of this shard.
        **hyper: the loss's hyperparameters (keys of its config dataclass); missing keys take defaults.

    Returns:
        loss_tok[B, T] in fp32 (fp64 for fp64 inputs), exactly 0 with zero gradient at masked
        positions; not yet aggregated (see aggregate_loss). metrics: str -> detached Tensor,
        per-token [B, T] diagnostics (0 at masked positions).
    """
    fn = _lookup(name)
    accepted = _keyword_defaults(fn)
    for key in hyper:
        if key not in accepted:
            raise ValueError(f"policy_loss {name!r}: unknown hyperparameter {key!r} (accepted: {sorted(accepted)})")
    shape = log_prob.shape
    for arg_name, tensor in (("old_log_prob", old_log_prob), ("advantages", advantages), ("mask", mask)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"policy_loss {name!r}: {arg_name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != shape:
            raise ValueError(
                f"policy_loss {name!r}: {arg_name} has shape {tuple(tensor.shape)}, log_prob has {tuple(shape)}"
            )
    for arg_name, tensor in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        if not tensor.is_floating_point():
            raise TypeError(f"policy_loss {name!r}: {arg_name} must be a floating tensor, got {tensor.dtype}")
    dtype = compute_dtype(log_prob.dtype)
    mask = mask.bool()
    zero = torch.zeros((), dtype=dtype, device=log_prob.device)
    lp = torch.where(mask, log_prob.to(dtype), zero)
    old_lp = torch.where(mask, old_log_prob.detach().to(dtype), zero)
    adv = torch.where(mask, advantages.detach().to(dtype), zero)
    loss_tok, metrics = fn(lp, old_lp, adv, mask, **hyper)
    loss_tok = torch.where(mask, loss_tok, zero)
    clean = {}
    for key, value in metrics.items():
        value = value.detach()
        if value.shape == shape:
            value = torch.where(mask, value.to(dtype), zero)
        clean[key] = value
    return loss_tok, clean
