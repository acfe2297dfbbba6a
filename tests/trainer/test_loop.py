"""The RL loop end to end on CPU: real Megatron (gloo), local engine, math-verify, weight sync."""
from __future__ import annotations

import json
import math

from tests.helpers import loop_cases as cases
from tests.helpers.multiproc import run_distributed


def _finite(record: dict, key: str) -> bool:
    return isinstance(record.get(key), (int, float)) and math.isfinite(record[key])


def _check_two_steps(out, records, nan_first_step=False, eval_every_step=False):
    assert [r["step"] for r in records] == [1, 2]
    for index, record in enumerate(records):
        if nan_first_step and index == 0:
            assert record["train/skipped_steps"] == 2 and record["train/optimizer_steps"] == 0
            continue
        for key in ("rollout/reward_mean", "train/loss", "train/grad_norm", "train/lr", "train/entropy",
                    "maspo/gated_pos_frac", "rollout/logprob_diff_abs_mean", "time/rollout_s", "time/sync_s"):
            assert _finite(record, key), key
        assert record["train/optimizer_steps"] == 2  # mini_batches=2 in the CPU default
        # The engine got the trainer's weights: its log-probs match the trainer's recomputation.
        assert record["rollout/logprob_diff_abs_max"] < 1e-4
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_2"
    assert (out / "hf" / "model.safetensors").is_file()
    if eval_every_step:  # trainer.eval_every=1: Avg@n / Pass@n / length logged with every step
        for record in records:
            assert 0.0 <= record["eval/synthetic/avg@2"] <= record["eval/synthetic/pass@2"] <= 1.0
            assert record["eval/synthetic/mean_length"] > 0
        # the last step's scheduled evaluation is the final one: reported, not run again
        final = json.loads((out / "final_eval.json").read_text())
        assert final["step"] == 2 and final["eval/synthetic/avg@2"] == records[-1]["eval/synthetic/avg@2"]
    else:
        assert (out / "final_eval.json").is_file()


def test_two_rl_steps_tp2xpp2(tmp_path):
    out = tmp_path / "run"
    results = run_distributed(cases.train, 4, str(out), ["parallel.tp=2", "parallel.pp=2", "trainer.eval_every=1"],
                              timeout_s=300)
    assert [r["code"] for r in results] == [0] * 4
    _check_two_steps(out, results[0]["metrics"], eval_every_step=True)


def test_two_rl_steps_tp1_with_failing_reward_aborted_and_empty_samples(tmp_path):
    """Two steps at TP1 while the reward function raises on about half of the responses, the
    engine returns one aborted and one empty sample per group, and step 1's gradients are NaN:
    all handled and reported; the NaN optimizer steps are skipped, never applied."""
    out = tmp_path / "run"
    result = run_distributed(cases.train_with_faulty_engine, 1, str(out),
                             ["reward.name=tests.trainer._rewards:raising_reward"], timeout_s=240)[0]
    assert result["code"] == 0
    _check_two_steps(out, result["metrics"], nan_first_step=True)
    assert result["unchanged"] and result["lr"] == 0  # no parameter change, no LR-schedule step
    for record in result["metrics"]:
        assert record["rollout/aborted_samples"] == 4  # one per group
        assert record["rollout/empty_samples"] == 4
        assert record["rollout/reward_errors"] > 0
        # Aborted (4) and empty (4) samples are not trained on.
        assert record["rollout/train_samples"] == 16 - 8


def test_all_groups_dropped_trains_nothing_and_says_so(tmp_path):
    out = tmp_path / "run"
    result = run_distributed(cases.train, 1, str(out), [
        "reward.name=tests.trainer._rewards:constant_reward", "data.dynamic_sampling=true",
        "data.max_extra_rounds=1", "trainer.eval_at_end=false"], timeout_s=240)[0]
    assert result["code"] == 0
    for record in result["metrics"]:
        assert record["train/no_data"] == 1
        assert record["rollout/dropped_groups"] > 0
        assert "train/loss" not in record


def test_engine_synced_every_k_steps_samples_from_stale_weights_in_between(tmp_path):
    """rollout.weight_sync.every_steps=2 over 3 steps: step 1 is not synced, so step 2 samples from the
    step-0 weights (its engine log-probs differ from the trainer's); step 2 syncs (every 2nd step) and
    step 3 (the last) too, so step 3 samples from the trained weights again."""
    out = tmp_path / "run"
    result = run_distributed(cases.train, 1, str(out), [
        "rollout.weight_sync.every_steps=2", "trainer.total_steps=3", "trainer.eval_at_end=false"], timeout_s=240)[0]
    assert result["code"] == 0
    records = result["metrics"]
    assert [r["step"] for r in records] == [1, 2, 3]
    drift = [r["rollout/logprob_diff_abs_max"] for r in records]
    assert drift[0] < 1e-4 and drift[2] < 1e-4, drift
    assert drift[1] > 1e-3, drift
    assert ["sync/bytes" in r for r in records] == [False, True, True]
