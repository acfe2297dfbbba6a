"""`option()`: a dataclass field with its bounds, choices and help text in one place.

The loader (loader.py) reads this metadata to validate every value at load time, so a range
lives next to its default instead of in scattered checks.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[Any] | None = None,
    help: str = "",
) -> Any:
    """A dataclass field whose value must satisfy the given bounds / choices (None = unchecked)."""
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_bounds(key: str, value: Any, metadata: dict) -> str | None:
    """Returns a message if `value` violates the field's metadata, else None."""
    if value is None:
        return None
    choices = metadata.get("choices")
    if choices is not None and value not in choices:
        return f"{key}: {value!r} is not one of {list(choices)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    for bound, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        limit = metadata.get(bound)
        if limit is not None and not ok(value, limit):
            return f"{key}: {value!r} must be {word} {limit}"
    return None
