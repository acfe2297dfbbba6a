"""The policy-loss registry and its one public entry point, `policy_loss`.

A loss is one module in algorithms/losses/ (imported automatically): a plain function chosen by
name from config, with its hyperparameters declared ONCE beside it as a dataclass of `option()`
fields (default, range, help). That dataclass IS the config section `algorithm.<name>`
(config/algorithm.py derives the sections from this registry):

    @dataclasses.dataclass
    class MyLossHyper:
        eps: float = option(0.2, gt=0, lt=1, help="clip range")

    @register_policy_loss("my_loss", MyLossHyper)
    def my_loss(log_prob, old_log_prob, advantages, mask, *, eps):
        ...
        return loss_tok, metrics

The function's keyword-only parameters are the hyperparameter fields plus any of LOSS_INPUTS,
the tensors the trainer computes for a loss that asks for them (trainer/loss_terms.py).
`policy_loss` does everything the losses share: unknown keys and values out of the declared
ranges are refused by name, shape checks, the upcast to (at least) fp32, detaching the old
log-probs and advantages, neutralising masked positions (so padding holding -inf or NaN cannot
leak into values or gradients), and zeroing the result there.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Callable, Iterator, Mapping, Optional

import torch

from maspo_megatron.algorithms.hyper import check_fields

PolicyLossFn = Callable[..., "tuple[torch.Tensor, dict[str, torch.Tensor]]"]

# What the trainer computes for a loss that names it as a keyword-only parameter (none is config).
LOSS_INPUTS = {
    "entropy": "entropy[B, T]: the policy's per-token entropy (detached)",
    "seq_log_ratio": "seq_log_ratio[B, T]: each token's whole-sample mean of the clamped log-ratio, over packed "
                     "rows and context-parallel shards (detached)",
    "batch_sums": "the loss's own `batch_sums(log_prob, old_log_prob, advantages, mask, **hyper)`, summed over "
                  "every rank that holds part of the batch (one all-reduce per micro-batch)",
}


@dataclasses.dataclass
class NoHyperparameters:
    """The section of a loss that declares none."""


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the registry knows of a loss; the trainer asks it instead of knowing loss names."""

    name: str
    fn: PolicyLossFn
    hyper: type                                   # the dataclass of algorithm.<name>
    inputs: tuple[str, ...]                       # keys of LOSS_INPUTS the loss takes
    batch_sums: Optional[Callable[..., torch.Tensor]] = None
    statistics: Optional[str] = None              # registered statistics reported with this loss


@dataclasses.dataclass(frozen=True)
class StatisticsSpec:
    """Additive diagnostics: `sums(log_prob, old_log_prob, advantages, mask, **hyper)` -> {key: scalar SUM},
    all-reduced by the caller, then `finalize(sums)` -> {metric name: float}. `hyper` is the section of
    the loss named `section` (the gate whose behaviour the statistics describe)."""

    name: str
    sums: Callable[..., dict]
    finalize: Callable[[dict], dict]
    section: str


class _LossFunctions(Mapping):
    """name -> loss function: a live, read-only view of LOSS_SPECS."""

    def __getitem__(self, name: str) -> PolicyLossFn:
        return LOSS_SPECS[name].fn

    def __iter__(self) -> Iterator[str]:
        return iter(LOSS_SPECS)

    def __len__(self) -> int:
        return len(LOSS_SPECS)


# name -> spec. Read-only for callers: add entries through register_policy_loss / register_statistics.
LOSS_SPECS: dict[str, LossSpec] = {}
STATISTICS: dict[str, StatisticsSpec] = {}
POLICY_LOSSES: Mapping[str, PolicyLossFn] = _LossFunctions()

DEFAULT_STATISTICS = "maspo"


def register_policy_loss(name: str, hyper: Optional[type] = None, *, batch_sums: Optional[Callable] = None,
                         statistics: Optional[str] = DEFAULT_STATISTICS,
                         replace: bool = False) -> Callable[[PolicyLossFn], PolicyLossFn]:
    """Decorator registering `fn(log_prob, old_log_prob, advantages, mask, *, <hyper fields>, <LOSS_INPUTS>)`.

    hyper: the dataclass of the loss's hyperparameters (defaults, ranges, help; an optional
    cross-field `validate()`); None for a loss without any. batch_sums: for a loss taking the
    `batch_sums` input, the function giving this shard's additive part of it. statistics: the
    registered statistics reported every step with this loss; by default MASPO's gate statistics,
    which every run reports as the comparison point (docs/experiments.md); None for none.
    The function receives prepared tensors (same shape, compute dtype >= fp32, masked positions
    set to 0, old_log_prob/advantages detached, mask bool) and returns `(loss_tok, metrics)`.
    """
    if not name.isidentifier():
        raise ValueError(f"policy loss {name!r}: the name must be an identifier (it names the config section)")
    hyper = hyper or NoHyperparameters
    if not dataclasses.is_dataclass(hyper):
        raise TypeError(f"policy loss {name!r}: hyper must be a dataclass of option() fields, got {hyper!r}")

    def decorator(fn: PolicyLossFn) -> PolicyLossFn:
        if name in LOSS_SPECS and not replace:
            raise ValueError(f"policy loss {name!r} is already registered (pass replace=True to override)")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(positional) != 4 or any(p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) for p in params):
            raise TypeError(f"policy loss {name!r}: expected fn(log_prob, old_log_prob, advantages, mask, *, "
                            "hyper..., inputs...)")
        keywords = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        fields = {f.name for f in dataclasses.fields(hyper)}
        inputs = tuple(sorted(keywords & set(LOSS_INPUTS)))
        if keywords != fields | set(inputs):
            raise TypeError(f"policy loss {name!r}: keyword-only parameters {sorted(keywords)} must be the fields of "
                            f"{hyper.__name__} {sorted(fields)} plus inputs from {sorted(LOSS_INPUTS)}")
        with_default = sorted(p.name for p in params if p.name in fields and p.default is not p.empty)
        if with_default:
            raise TypeError(f"policy loss {name!r}: {with_default} take their defaults from {hyper.__name__} (declared "
                            "once): drop them from the signature")
        if ("batch_sums" in inputs) != (batch_sums is not None):
            raise TypeError(f"policy loss {name!r}: the batch_sums input and register_policy_loss(batch_sums=...) "
                            "go together")
        LOSS_SPECS[name] = LossSpec(name, fn, hyper, inputs, batch_sums, statistics)
        return fn

    return decorator


def unregister_policy_loss(name: str) -> None:
    """Removes a loss (tests register their own for one test only)."""
    LOSS_SPECS.pop(name, None)


def register_statistics(name: str, sums: Callable[..., dict], finalize: Callable[[dict], dict], section: str) -> None:
    STATISTICS[name] = StatisticsSpec(name, sums, finalize, section)


def loss_spec(name: str) -> LossSpec:
    try:
        return LOSS_SPECS[name]
    except KeyError:
        raise ValueError(f"policy_loss: unknown loss {name!r} (registered: {sorted(LOSS_SPECS)})") from None


def loss_names() -> tuple[str, ...]:
    """The registered losses, sorted (the choices of algorithm.loss)."""
    return tuple(sorted(LOSS_SPECS))


def loss_hyperparameters(name: str) -> dict:
    """The hyperparameters a registered loss accepts, with their defaults: {key: default}."""
    return _as_kwargs(loss_spec(name).hyper())


def loss_statistics(name: str) -> Optional[StatisticsSpec]:
    """The statistics reported with loss `name` (None: none)."""
    stats = loss_spec(name).statistics
    if stats is None:
        return None
    if stats not in STATISTICS:
        raise ValueError(f"policy loss {name!r}: statistics {stats!r} are not registered ({sorted(STATISTICS)})")
    return STATISTICS[stats]


def _as_kwargs(hyper) -> dict:
    return {field.name: getattr(hyper, field.name) for field in dataclasses.fields(hyper)}


def checked_hyperparameters(name: str, **hyper) -> dict:
    """All of loss `name`'s hyperparameters (defaults for missing keys), each checked against its declaration.

    Raises ValueError naming the loss and the key: unknown keys, values out of range, cross-field rules.
    """
    spec = loss_spec(name)
    try:
        key = (spec, tuple(sorted(hyper.items())))
        hash(key)
    except TypeError:  # an unhashable value: checked, just not remembered
        return dict(_check(spec, tuple(sorted(hyper.items(), key=lambda item: item[0]))))
    return dict(_checked(*key))


@functools.lru_cache(maxsize=256)
def _checked(spec: LossSpec, items: tuple) -> dict:
    # remembered: policy_loss runs once per micro-batch with the same hyperparameters
    return _check(spec, items)


def _check(spec: LossSpec, items: tuple) -> dict:
    hyper = dict(items)
    fields = {field.name for field in dataclasses.fields(spec.hyper)}
    for key in hyper:
        if key not in fields:
            raise ValueError(f"policy_loss {spec.name!r}: unknown hyperparameter {key!r} (accepted: {sorted(fields)})")
    values = spec.hyper(**hyper)
    try:
        check_fields(values)
    except ValueError as exc:
        raise ValueError(f"policy_loss {spec.name!r}: {exc}") from None
    return _as_kwargs(values)


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
        **hyper: the loss's hyperparameters (fields of its declared dataclass; missing keys take the
            defaults, values are checked against the declared ranges) and the LOSS_INPUTS it takes.

    Returns:
        loss_tok[B, T] in fp32 (fp64 for fp64 inputs), exactly 0 with zero gradient at masked
        positions; not yet aggregated (see aggregate_loss). metrics: str -> detached Tensor,
        per-token [B, T] diagnostics (0 at masked positions).
    """
    spec = loss_spec(name)
    inputs = {key: hyper.pop(key) for key in spec.inputs if key in hyper}
    hyper = checked_hyperparameters(name, **hyper)
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
    loss_tok, metrics = spec.fn(lp, old_lp, adv, mask, **hyper, **inputs)
    loss_tok = torch.where(mask, loss_tok, zero)
    clean = {}
    for key, value in metrics.items():
        value = value.detach()
        if value.shape == shape:
            value = torch.where(mask, value.to(dtype), zero)
        clean[key] = value
    return loss_tok, clean
