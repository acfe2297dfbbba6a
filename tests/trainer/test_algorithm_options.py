"""Algorithm options end to end (real Trainer, TP1 on gloo, local engine): the r == 1 warning,
masking of truncated responses, and the rollout correction's metrics; plus the pure helpers."""
from __future__ import annotations

import math

from maspo_megatron.config import load_config
from maspo_megatron.config.algorithm import AlgorithmConfig, ratio_is_one_by_construction
from maspo_megatron.trainer.loop import eval_sampling_overrides, startup_warnings
from tests.helpers import loop_cases as cases
from tests.helpers.multiproc import run_distributed


def test_ratio_is_one_only_for_one_on_policy_update():
    assert ratio_is_one_by_construction(AlgorithmConfig(mini_batches=1, ppo_epochs=1))
    assert not ratio_is_one_by_construction(AlgorithmConfig())  # default: 4 mini-batches
    assert not ratio_is_one_by_construction(AlgorithmConfig(mini_batches=1, ppo_epochs=2))
    assert not ratio_is_one_by_construction(AlgorithmConfig(mini_batches=1, old_logprob_source="engine"))
    lines = []
    cfg = load_config(cases.EXAMPLE, ["algorithm.mini_batches=1", "algorithm.loss=grpo"])
    assert startup_warnings(cfg, lines.append) == {"warn/ratio_is_one_by_construction": 1}
    assert len(lines) == 1 and "r == 1" in lines[0] and "grpo" in lines[0] and "\n" not in lines[0]
    lines.clear()
    assert startup_warnings(load_config(cases.EXAMPLE), lines.append) == {} and lines == []


def test_eval_sampling_overrides():
    cfg = load_config(cases.EXAMPLE)
    assert eval_sampling_overrides(cfg.trainer) == {}
    cfg = load_config(cases.EXAMPLE, ["trainer.eval_temperature=0.6", "trainer.eval_top_p=0.95"])
    assert eval_sampling_overrides(cfg.trainer) == {"temperature": 0.6, "top_p": 0.95}
    cfg = load_config(cases.EXAMPLE, ["trainer.eval_greedy=true"])
    assert eval_sampling_overrides(cfg.trainer) == {"top_k": 1}


def test_two_steps_with_masked_truncation_warning_and_rollout_correction(tmp_path):
    out = tmp_path / "run"
    overrides = ["algorithm.mini_batches=1", "algorithm.ppo_epochs=1", "algorithm.mask_truncated=true",
                 "rollout.max_new_tokens=6", "algorithm.rollout_correction.is_level=sequence",
                 "algorithm.rollout_correction.rs_level=token", "trainer.eval_temperature=0.5"]
    result = run_distributed(cases.train, 1, str(out), overrides, timeout_s=240)[0]
    assert result["code"] == 0
    first, second = result["metrics"]
    assert first["warn/ratio_is_one_by_construction"] == 1  # logged once, with the first step
    assert "warn/ratio_is_one_by_construction" not in second
    masked_total = kept_total = 0
    for record in (first, second):
        truncated = round(record["rollout/truncated_frac"] * record["rollout/num_samples"])
        assert record["rollout/masked_truncated"] == truncated
        kept = record["rollout/num_samples"] - truncated - record["rollout/empty_samples"]
        assert record["rollout/train_samples"] == kept
        masked_total += truncated
        kept_total += kept
        if kept:
            # the engine holds the trainer's weights: pi_old == pi_rollout up to float noise
            assert 0 <= record["train/mismatch/kl_k3_mean"] < 1e-6
            assert math.isclose(record["train/mismatch/is_weight_mean"], 1.0, rel_tol=1e-4)
            assert record["train/mismatch/rejected_frac_mean"] == 0
    assert masked_total > 0 and kept_total > 0  # the case must exercise masking AND train on the rest


def _without_timings_and_warnings(records):
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "warn/"))} for r in records]


def test_kl_to_the_reference_policy_and_exact_resume(tmp_path):
    """kl_coef > 0: the reference is the policy as RL starts, so the KL is exactly 0 at step 1 (one
    on-policy update) and > 0 once the policy moved; 3 steps straight == 1 step + resume to 3
    (the reference is reloaded from <output_dir>/reference), metrics and final weights identical."""
    import torch
    from safetensors.torch import load_file

    overrides = ["algorithm.kl_coef=0.05", "algorithm.kl_estimator=low_var_kl", "algorithm.mini_batches=1",
                 "trainer.eval_at_end=false", "trainer.total_steps=3"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_distributed(cases.train, 1, str(straight), overrides, timeout_s=240)[0]
    assert result["code"] == 0
    records = result["metrics"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert records[0]["train/kl"] == 0.0
    assert records[1]["train/kl"] > 0 and records[2]["train/kl"] > 0
    assert (straight / "reference" / "metadata.json").is_file()
    first = run_distributed(cases.train, 1, str(resumed), [*overrides, "trainer.total_steps=1"], timeout_s=240)[0]
    assert first["code"] == 0
    second = run_distributed(cases.train, 1, str(resumed), overrides, timeout_s=240)[0]
    assert second["code"] == 0
    assert _without_timings_and_warnings(second["metrics"]) == _without_timings_and_warnings(records)
    a, b = load_file(straight / "hf" / "model.safetensors"), load_file(resumed / "hf" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)
