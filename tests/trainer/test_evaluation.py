"""Avg@n / Pass@n against hand-computed values."""
import math

import pytest

from maspo_megatron.trainer.evaluation import eval_metrics, pass_at_k


def test_pass_at_k_hand_values():
    assert pass_at_k(4, 0, 4) == 0.0
    assert pass_at_k(4, 1, 4) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)


def test_eval_metrics_names_and_values():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, True, True]]
    lengths = [[4, 6, 8, 10], [2, 2, 2, 2], [5, 5, 5, 5]]
    out = eval_metrics("math500", correct, lengths)
    assert out["eval/math500/avg@4"] == pytest.approx(5 / 12)
    assert out["eval/math500/pass@4"] == pytest.approx(2 / 3)
    assert out["eval/math500/mean_length"] == pytest.approx(56 / 12)
    assert math.isclose(eval_metrics("g", [[True], [False]], [[1], [3]])["eval/g/avg@1"], 0.5)


def test_eval_metrics_rejects_ragged_and_empty():
    with pytest.raises(ValueError, match="same number of samples"):
        eval_metrics("x", [[True], [True, False]], [[1], [1, 2]])
    with pytest.raises(ValueError, match="no prompts"):
        eval_metrics("x", [], [])
    with pytest.raises(ValueError, match="num_correct"):
        pass_at_k(2, 3, 1)
