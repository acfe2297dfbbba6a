"""The sweep's reductions against values computed by hand."""
from __future__ import annotations

import json
import math

import pytest
from _experiments_stats import (
    RunData,
    across_seeds,
    describe_difference,
    eval_key,
    gated_gate_weight,
    mean_std,
    paired_differences,
    read_metrics,
    steps_to_threshold,
    tail_mean,
    trailing_mean,
)


def _run(seed, rewards, method="m"):
    return RunData(method, seed, [{"step": i + 1, "rollout/reward_mean": r} for i, r in enumerate(rewards)], {})


def test_mean_std_is_the_sample_std():
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    # deviations -4/3, -1/3, 5/3: squares 16/9 + 1/9 + 25/9 = 42/9; / (n - 1) = 21/9
    assert std == pytest.approx(math.sqrt(21 / 9))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_trailing_mean_averages_what_exists_at_the_start():
    assert trailing_mean([1, 2, 3, 4], 2) == [1.0, 1.5, 2.5, 3.5]
    assert trailing_mean([3, 6], 5) == [3.0, 4.5]


def test_steps_to_threshold_needs_a_full_window():
    steps = [1, 2, 3, 4, 5, 6]
    rewards = [0.9, 0.1, 0.2, 0.6, 0.7, 0.8]
    # windows of 3: (0.9,0.1,0.2)=0.4 at step 3, (0.1,0.2,0.6)=0.3, (0.2,0.6,0.7)=0.5 at step 5
    assert steps_to_threshold(steps, rewards, 0.5, 3) == 5
    assert steps_to_threshold(steps, rewards, 0.95, 3) is None
    # a single early spike (step 1) does not count with a window of 3, but does with 1
    assert steps_to_threshold(steps, rewards, 0.85, 1) == 1
    # logged steps need not start at 1 or be contiguous
    assert steps_to_threshold([10, 20, 30], [0.0, 1.0, 1.0], 1.0, 2) == 30


def test_across_seeds_aligns_by_step_and_counts_seeds():
    runs = [_run(1, [0.0, 1.0, 0.5]), _run(2, [1.0, 0.0])]
    steps, mean, std, count = across_seeds(runs, "rollout/reward_mean")
    assert steps == [1, 2, 3]
    assert mean == [0.5, 0.5, 0.5]
    assert std == pytest.approx([math.sqrt(0.5), math.sqrt(0.5), 0.0])
    assert count == [2, 2, 1]


def test_series_skips_missing_and_non_finite_values():
    # null: how metrics.jsonl writes a non-finite value; "nan": how it did before 2026-12-05
    run = RunData("m", 1, [{"step": 1, "x": 1.0}, {"step": 2}, {"step": 3, "x": "nan"}, {"step": 4, "x": 3.0},
                           {"step": 5, "x": None}], None)
    assert run.series("x") == ([1, 4], [1.0, 3.0])
    assert tail_mean(run, "x", 1) == 3.0
    assert tail_mean(run, "x", 10) == 2.0


def test_read_metrics_skips_cut_lines_and_keeps_the_last_record_of_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 2, "a": 1}) + "\n" + json.dumps({"step": 1, "a": 5}) + "\n"
                    + json.dumps({"step": 2, "a": 7}) + "\n" + '{"step": 3, "a"')
    assert read_metrics(path) == [{"step": 1, "a": 5}, {"step": 2, "a": 7}]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_eval_key_finds_the_k():
    record = {"step": 60, "eval/heldout/avg@16": 0.25, "eval/heldout/pass@16": 0.75, "eval/other/avg@4": 1.0}
    assert eval_key(record, "heldout", "avg") == ("eval/heldout/avg@16", 0.25)
    key, value = eval_key({"step": 3, "eval/heldout/avg@16": None}, "heldout", "avg")  # a non-finite value: null
    assert key == "eval/heldout/avg@16" and math.isnan(value)
    assert eval_key(record, "heldout", "pass") == ("eval/heldout/pass@16", 0.75)
    assert eval_key(None, "heldout", "avg")[0] is None


def test_paired_differences_and_their_description():
    diffs = paired_differences({1: 0.5, 2: 0.4, 3: 0.3}, {1: 0.25, 2: 0.5, 3: float("nan"), 4: 0.0})
    assert diffs == {1: pytest.approx(0.25), 2: pytest.approx(-0.1)}
    text = describe_difference(diffs)
    assert text.startswith("+0.075") and "mixed: higher on 1, lower on 1 of 2 seeds" in text
    assert "higher on 2/2 seeds" in describe_difference({1: 0.1, 2: 0.2})
    assert "lower on 1/1 seeds" in describe_difference({1: -0.1})
    assert "equal on 1/1" in describe_difference({1: 0.0})
    assert describe_difference({}).startswith("n/a")


def test_gate_weight_on_gated_tokens_from_the_all_token_mean():
    # 100 tokens, 20 gated with mean weight 0.9, 80 ungated at 1: all-token mean = (18 + 80) / 100 = 0.98
    records = [{"step": 1, "maspo/gate_weight_mean": 0.98, "maspo/gated_pos_frac": 0.15, "maspo/gated_neg_frac": 0.05},
               {"step": 2, "maspo/gate_weight_mean": 1.0, "maspo/gated_pos_frac": 0.0, "maspo/gated_neg_frac": 0.0},
               {"step": 3, "maspo/gate_weight_mean": 0.95, "maspo/gated_pos_frac": 0.1, "maspo/gated_neg_frac": 0.0}]
    # step 1: 0.9; step 2: nothing gated, left out; step 3: 1 - 0.05 / 0.1 = 0.5
    assert gated_gate_weight(RunData("m", 1, records, None)) == pytest.approx(0.7)


def test_hard_clip_ablation_is_checked_against_grpo_seed_by_seed():
    from _experiments_report import hard_clip_check

    final = {"eval/heldout/avg@4": 0.5}
    grpo = [_run(1, [0.1, 0.2], "grpo"), _run(2, [0.3, 0.4], "grpo")]
    for run in grpo:
        run.final_eval = final
    hard = [_run(1, [0.1, 0.2], "maspo_hard_clip"), _run(2, [0.3, 0.45], "maspo_hard_clip")]
    for run in hard:
        run.final_eval = final
    text = " ".join(hard_clip_check({"grpo": grpo, "maspo_hard_clip": hard}))
    assert "on 1/2 seeds" in text and "not bit-reproducible" in text
    hard[1] = _run(2, [0.3, 0.4], "maspo_hard_clip")
    hard[1].final_eval = final
    assert "on 2/2 seeds." in " ".join(hard_clip_check({"grpo": grpo, "maspo_hard_clip": hard}))
    assert hard_clip_check({"grpo": grpo}) == []
