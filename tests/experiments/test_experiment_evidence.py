"""The evidence sweep's design: learning-rate grid expansion, held-out curves, pooled gate statistics
and the preconditions-before-verdict logic (tools/_experiments_evidence.py), against hand values."""
import math
from pathlib import Path

import pytest
from _experiments_evidence import evidence_section, heldout_curve, paired_curves, pooled_gate_statistics
from _experiments_plan import SweepError, load_sweep
from _experiments_stats import RunData

REPO = Path(__file__).resolve().parents[2]
EVIDENCE = REPO / "examples" / "experiments" / "evidence.yaml"


def test_evidence_sweep_expands_every_method_per_learning_rate():
    sweep = load_sweep(EVIDENCE)
    assert len(sweep.learning_rates) >= 2 and len(sweep.seeds) >= 10
    bases = {m.base for m in sweep.methods.values()}
    assert bases == {"grpo", "maspo", "pg_unclipped", "maspo_alpha0", "clip_higher", "sapo"}
    assert len(sweep.methods) == len(bases) * len(sweep.learning_rates)
    method = sweep.methods["maspo_lr1"]
    assert method.lr == sweep.learning_rates[1]
    assert method.overrides[-1] == f"trainer.lr={sweep.learning_rates[1]!r}"


def test_evidence_base_config_is_the_harder_start():
    from maspo_megatron.config import load_config

    sweep = load_sweep(EVIDENCE)
    cfg = load_config(sweep.base, [])
    assert (cfg.algorithm.mini_batches, cfg.algorithm.ppo_epochs) == (8, 4)
    assert cfg.rollout.temperature == 1.0 and sweep.heldout_prompts >= 256
    # plain answers scored by an anchored pattern, imperfect demonstrations (the re-design of 2026-12-04)
    assert cfg.data.synthetic.answer_format == "plain" and cfg.data.synthetic.reference_noise > 0
    assert cfg.reward.answer_pattern is not None


def test_bad_learning_rates_name_the_key(tmp_path):
    text = EVIDENCE.read_text().replace("base: evidence_base.yaml", f"base: {EVIDENCE.parent / 'evidence_base.yaml'}")
    for bad in ("[0.001, 0.001]", "[-1.0]", "0.001"):
        path = tmp_path / "s.yaml"
        path.write_text(text.replace("learning_rates: [5.0e-4, 1.0e-3]", f"learning_rates: {bad}"))
        with pytest.raises(SweepError, match="learning_rates"):
            load_sweep(path)


def _run(seed, records, final=None):
    return RunData("m", seed, records, final)


def test_heldout_curve_joins_warmup_periodic_and_final():
    records = [{"step": 1}, {"step": 2, "eval/heldout/avg@8": 0.3}, {"step": 3}]
    curve = heldout_curve(_run(1, records, {"eval/heldout/avg@8": 0.4}), {"eval/heldout/avg@8": 0.2})
    assert curve == ([0, 2, 3], [0.2, 0.3, 0.4])


def test_pooled_gate_statistics_weights_steps_by_tokens():
    a = {"step": 1, "maspo/token_count": 100.0, "maspo/ppo_clip_frac": 0.1, "maspo/gated_pos_frac": 0.2,
         "maspo/gated_neg_frac": 0.2, "maspo/gate_weight_mean_gated": 0.9, "maspo/p_lt_0.01/token_frac": 0.0,
         "maspo/p_0.01_0.1/token_frac": 0.5}
    b = {"step": 2, "maspo/token_count": 300.0, "maspo/ppo_clip_frac": 0.02, "maspo/gated_pos_frac": 0.1,
         "maspo/gated_neg_frac": 0.0, "maspo/gate_weight_mean_gated": 0.5, "maspo/p_lt_0.01/token_frac": 0.1,
         "maspo/p_0.01_0.1/token_frac": 0.0}
    # a step where nothing was gated: the trainer logs its NaN gate weight as null ("nan" before 2026-12-05)
    c = {"step": 4, "maspo/token_count": 0.0, "maspo/gate_weight_mean_gated": None}
    d = {"step": 5, "maspo/token_count": 100.0, "maspo/ppo_clip_frac": 0.0, "maspo/gated_pos_frac": 0.0,
         "maspo/gated_neg_frac": 0.0, "maspo/gate_weight_mean_gated": "nan", "maspo/p_lt_0.01/token_frac": 0.0,
         "maspo/p_0.01_0.1/token_frac": 0.0}
    stats = pooled_gate_statistics([_run(1, [a, c]), _run(2, [b, {"step": 3}])])
    assert stats["ppo_clip_frac"] == pytest.approx((10 + 6) / 400)
    assert stats["gate_weight_mean_gated"] == pytest.approx((0.9 * 40 + 0.5 * 30) / 70)
    assert stats["p_lt_0.01/token_frac"] == pytest.approx(30 / 400)
    assert stats["p_0.01_0.1/token_frac"] == pytest.approx(50 / 400)
    assert math.isnan(pooled_gate_statistics([])["ppo_clip_frac"])
    with_empty = pooled_gate_statistics([_run(1, [a, d])])
    assert with_empty["gate_weight_mean_gated"] == pytest.approx(0.9)
    assert with_empty["ppo_clip_frac"] == pytest.approx(10 / 200)


def _records(clip, weight):
    return [{"step": s, "maspo/token_count": 100.0, "maspo/ppo_clip_frac": clip, "maspo/gated_pos_frac": 0.3,
             "maspo/gated_neg_frac": 0.1, "maspo/gate_weight_mean_gated": weight, "maspo/p_lt_0.01/token_frac": 0.05,
             "maspo/p_0.01_0.1/token_frac": 0.05, **({"eval/heldout/avg@8": 0.2 + 0.01 * s} if s == 2 else {})}
            for s in (1, 2, 3)]


def _sweep_runs(clip, maspo_gain):
    sweep = load_sweep(EVIDENCE)
    runs = {}
    for name, method in sweep.methods.items():
        gain = maspo_gain if method.base == "maspo" else 0.0
        runs[name] = [_run(seed, _records(clip, 0.8), {"eval/heldout/avg@8": 0.3 + gain + 0.001 * seed * (seed % 3)})
                      for seed in sweep.seeds]
    warm = {seed: {"eval/heldout/avg@8": 0.2} for seed in sweep.seeds}
    return sweep, runs, warm


def test_verdict_only_when_preconditions_hold(tmp_path):
    sweep, runs, warm = _sweep_runs(clip=0.1, maspo_gain=0.05)
    lines, summary = evidence_section(sweep, runs, warm, tmp_path, ".")
    rate = f"{sweep.learning_rates[0]:g}"
    assert summary["paired"][f"maspo - grpo @ {rate}"]["verdict"] == "higher"
    assert summary["paired"][f"pg_unclipped - grpo @ {rate}"]["verdict"] == "no resolved difference"
    assert (tmp_path / "heldout_vs_step.png").read_bytes()[:4] == b"\x89PNG"
    text = "\n".join(lines)
    assert text.index("Preconditions at lr") < text.index("Paired differences")

    sweep, runs, warm = _sweep_runs(clip=0.01, maspo_gain=0.05)  # GRPO hardly clips: no verdict
    _, summary = evidence_section(sweep, runs, warm, tmp_path, ".")
    assert summary["paired"][f"maspo - grpo @ {rate}"]["verdict"] == "inconclusive (preconditions fail)"


def test_preconditions_on_tokens_with_nonzero_advantage_decide_when_logged(tmp_path):
    """GRPO clips 3 % of all tokens but 8 % of the A != 0 ones: the verdict uses the latter, and both
    tables are printed; the training-reward band is drawn from rollout/reward_mean."""
    sweep, runs, warm = _sweep_runs(clip=0.03, maspo_gain=0.05)
    for arm_runs in runs.values():
        for run in arm_runs:
            for record in run.records:
                record.update({key.replace("maspo/", "maspo_active/"): value for key, value in record.items()
                               if key.startswith("maspo/")})
                record["maspo_active/token_count"] = 60.0
                record["maspo_active/ppo_clip_frac"] = 0.08
                record["rollout/reward_mean"] = 0.4
    lines, summary = evidence_section(sweep, runs, warm, tmp_path, ".")
    rate = f"{sweep.learning_rates[0]:g}"
    assert summary["paired"][f"maspo - grpo @ {rate}"]["verdict"] == "higher"
    assert not summary["preconditions_all_tokens"][str(sweep.learning_rates[0])][0]["ok"]
    assert summary["arms"][f"grpo @ {rate}"]["prefix"] == "maspo_active"
    assert summary["arms"][f"grpo @ {rate}"]["ppo_clip_frac"] == pytest.approx(0.08)
    text = "\n".join(lines)
    assert "on the tokens with A != 0:" in text and "on every response token" in text


def test_paired_curves_subtract_grpo_of_the_same_seed_at_shared_steps():
    per_run = {"grpo": {0.1: {1: ([0, 6, 12], [0.2, 0.3, 0.5]), 2: ([0, 6], [0.1, 0.1])}},
               "maspo": {0.1: {1: ([0, 6, 12], [0.2, 0.4, 0.25]), 2: ([0, 12], [0.1, 0.9]), 3: ([0], [0.5])}}}
    out = paired_curves(per_run)
    assert set(out) == {"maspo"}
    steps, values = out["maspo"][0.1][1]
    assert steps == [0, 6, 12] and values == pytest.approx([0.0, 0.1, -0.25])
    assert out["maspo"][0.1][2] == ([0], [0.0])  # step 12 has no GRPO value on seed 2
    assert 3 not in out["maspo"][0.1]  # no GRPO run on seed 3
