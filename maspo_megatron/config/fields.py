"""`option()`, `check_bounds` and `check_fields`, as every config section uses them.

They are declared once, in maspo_megatron/algorithms/hyper.py, because the policy losses declare
their hyperparameters with the same field helper (the `algorithm.<loss>` sections ARE those
declarations); see that module.
"""
from maspo_megatron.algorithms.hyper import allowed_choices, check_bounds, check_fields, option

__all__ = ["allowed_choices", "check_bounds", "check_fields", "option"]
