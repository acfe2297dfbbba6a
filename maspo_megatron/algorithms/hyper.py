"""`option()`: a dataclass field with its bounds, choices and help text in one place.

Every config section (maspo_megatron/config) and every policy loss's hyperparameters
(algorithms/losses/*) are declared with it; `check_bounds` reads the metadata, so a range
lives next to its default instead of in scattered checks. `choices` may be a tuple or a
zero-argument callable returning the names a registry holds (read when a value is checked).
Pure Python: config, the losses and `policy_loss` all share it.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence, Union

Choices = Union[Sequence[Any], Callable[[], Sequence[Any]]]


def option(
    default: Any = dataclasses.MISSING,
    *,
    factory: Callable[[], Any] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Choices | None = None,
    help: str = "",
) -> Any:
    """A dataclass field whose value must satisfy the given bounds / choices (None = unchecked)."""
    if choices is not None and not callable(choices):
        choices = tuple(choices)
    metadata = {"ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices or None, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def allowed_choices(metadata: dict) -> tuple | None:
    """The field's choices as a tuple (a registry's names read now), or None when unrestricted."""
    choices = metadata.get("choices")
    if choices is None:
        return None
    return tuple(choices() if callable(choices) else choices)


def check_bounds(key: str, value: Any, metadata: dict) -> str | None:
    """Returns a message if `value` violates the field's metadata, else None."""
    if value is None:
        return None
    choices = allowed_choices(metadata)
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


def check_fields(instance: Any, prefix: str = "") -> None:
    """Raises ValueError naming `prefix + field` for the first field of dataclass `instance` out of its
    bounds/choices, then runs the instance's own cross-field `validate()` when it has one."""
    for field in dataclasses.fields(instance):
        problem = check_bounds(prefix + field.name, getattr(instance, field.name), dict(field.metadata))
        if problem:
            raise ValueError(problem)
    validate = getattr(instance, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as exc:
            raise ValueError(f"{prefix}{exc}") from None
