"""Reward functions by name: `@register_reward("name")` or a "package.module:function" import path.

A reward function is called as `fn(response, ground_truth, metadata, **options)` and returns a
number, a `RewardResult`, or `(reward, reason)`. It may be `async def` (e.g. a remote verifier over
HTTP); async rewards run concurrently in the calling process, sync ones in worker processes.
"""
from __future__ import annotations

import importlib
from typing import Callable

_BUILTIN_MODULES = ("maspo_megatron.rewards.math_reward",)
_REGISTRY: dict[str, Callable] = {}


class RewardError(ValueError):
    """A reward that cannot be found or built. The message is one line and names the reward."""


def register_reward(name: str) -> Callable[[Callable], Callable]:
    """Decorator: makes `fn` available as `name` in configs (`reward.name: name`)."""

    def decorate(fn: Callable) -> Callable:
        existing = _REGISTRY.get(name)
        if existing is not None and _qualified(existing) != _qualified(fn):
            raise RewardError(f"reward {name!r}: already registered by {_qualified(existing)}")
        _REGISTRY[name] = fn
        return fn

    return decorate


def _qualified(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"


def registered_rewards() -> list[str]:
    _import_builtins()
    return sorted(_REGISTRY)


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def get_reward(name: str) -> Callable:
    """The reward function for a registry name or a "module:function" path."""
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise RewardError(f"reward {name!r}: cannot import module {module_name!r} ({exc})") from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise RewardError(f"reward {name!r}: module {module_name!r} has no attribute {attr!r}")
        if not callable(fn):
            raise RewardError(f"reward {name!r}: {attr!r} is not callable")
        return fn
    _import_builtins()
    if name not in _REGISTRY:
        raise RewardError(f"reward {name!r}: unknown (registered: {', '.join(sorted(_REGISTRY))}; or use 'module:function')")
    return _REGISTRY[name]
