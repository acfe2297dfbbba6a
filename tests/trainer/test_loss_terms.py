"""The trainer's loss with the rollout correction, the KL term and the official normaliser, against
an independent float64 computation from the logits (one process, no parallelism).

Reference: log_softmax in float64 -> per-token loss and d loss / d log-prob from
tests/helpers/loss_reference.py (plain math) -> IS weights / rejection / KL written here from their
definitions -> the chain rule through log_softmax by autograd on the reference's own float64 graph.
"""
from __future__ import annotations

import math

import pytest
import torch

from maspo_megatron.config.algorithm import AlgorithmConfig, RolloutCorrectionConfig
from maspo_megatron.trainer.batch import TrainSample, pack_micro_batches
from maspo_megatron.trainer.loss import LossSettings, compute_loss
from maspo_megatron.trainer.loss_terms import kept_tokens
from tests.helpers import loss_reference as ref

VOCAB = 17


def _batches(row_tokens=20):
    gen = torch.Generator().manual_seed(11)
    samples = []
    for _ in range(6):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 4, (1,), generator=gen)),), generator=gen).tolist()
        n = int(torch.randint(2, 9, (1,), generator=gen))
        response = torch.randint(1, VOCAB, (n,), generator=gen).tolist()
        engine = (-torch.rand(n, generator=gen) * 3 - 0.5).tolist()
        samples.append(TrainSample(prompt, response, float(torch.randn((), generator=gen)), engine))
    batches = pack_micro_batches(samples, row_tokens=row_tokens)[0]
    for batch in batches:  # the trainer's pi_old and a reference policy, as the old-log-prob pass fills them
        noise = 0.25 * torch.randn(batch.old_log_probs.shape, generator=gen)
        batch.old_log_probs = torch.where(batch.loss_mask, batch.rollout_log_probs + noise, batch.old_log_probs)
        batch.ref_log_probs = torch.where(batch.loss_mask, batch.rollout_log_probs - 0.3 * torch.rand(
            batch.old_log_probs.shape, generator=gen), batch.ref_log_probs)
    logits = [torch.randn(*b.tokens.shape, VOCAB, generator=gen, dtype=torch.float64) for b in batches]
    return batches, logits


def _reference(batches, logits, *, is_threshold=None, rs=None, adv_cap=None, kl_coef=0.0, mode="token-mean"):
    """(loss, d loss / d logits per micro-batch) in float64 for GRPO (eps 0.2, c = 3).

    Rejected tokens carry no loss and no KL and leave the token counts (verl's modified response_mask).
    """
    def log_ratio(batch, r, t):
        return min(max(float(batch.old_log_probs[r, t]) - float(batch.rollout_log_probs[r, t]), -20.0), 20.0)

    def kept(batch):
        return [(r, t) for r, t in batch.loss_mask.nonzero().tolist()
                if rs is None or rs[0] <= math.exp(log_ratio(batch, r, t)) <= rs[1]]

    global_kept = sum(len(kept(batch)) for batch in batches)
    total, grads = 0.0, []
    for batch, raw in zip(batches, logits, strict=True):
        leaf = raw.clone().requires_grad_()
        lp = torch.log_softmax(leaf, -1).gather(-1, batch.target[..., None])[..., 0]
        coeff = torch.zeros_like(lp)
        norm = global_kept if mode == "token-mean" else len(kept(batch)) * len(batches)
        for r, t in kept(batch):
            x = log_ratio(batch, r, t)
            weight = min(math.exp(x), is_threshold) if is_threshold is not None else 1.0
            adv = float(batch.advantages[r, t]) * (min(math.exp(x), adv_cap) if adv_cap is not None else 1.0)
            value, slope = ref.grpo(float(lp.detach()[r, t]), float(batch.old_log_probs[r, t]), adv)
            d = float(lp.detach()[r, t]) - float(batch.ref_log_probs[r, t])  # low_var_kl: value clamped at 10
            kl_value, kl_slope = math.exp(-d) - 1 + d, 1 - math.exp(-d)
            if kl_value > 10:
                kl_value, kl_slope = 10.0, 0.0
            total += (weight * value + kl_coef * kl_value) / norm
            coeff[r, t] = (weight * slope + kl_coef * kl_slope) / norm
        (coeff * lp).sum().backward()
        grads.append(leaf.grad)
    return total, grads


def _ours(batches, logits, correction, *, kl_coef=0.0, mode="token-mean"):
    algorithm = AlgorithmConfig(loss="grpo", aggregation=mode, kl_coef=kl_coef, rollout_correction=correction)
    settings = LossSettings.from_config(algorithm)
    total, sums = 0.0, []
    leaves = [x.clone().requires_grad_() for x in logits]
    kept = kept_tokens(batches, correction)
    for leaf, batch in zip(leaves, batches, strict=True):
        contribution, metric_sums = compute_loss(leaf, batch, settings, micro_batch_count=len(batches), kept=kept)
        total = total + contribution
        sums.append(metric_sums)
    total.backward()
    return float(total.detach()), [leaf.grad for leaf in leaves], sums


@pytest.mark.parametrize("case", ["is_token+rejection+kl", "advantage_tis", "none+kl"])
def test_corrections_and_kl_match_float64_reference(case):
    batches, logits = _batches()
    assert len(batches) >= 2
    if case == "is_token+rejection+kl":
        cfg = RolloutCorrectionConfig(is_level="token", is_threshold=1.2, rs_level="token", rs_upper=1.3)
        expected = _reference(batches, logits, is_threshold=1.2, rs=(1 / 1.3, 1.3), kl_coef=0.1)
        kl = 0.1
    elif case == "advantage_tis":
        cfg = RolloutCorrectionConfig(advantage_tis_cap=1.1)
        expected, kl = _reference(batches, logits, adv_cap=1.1), 0.0
    else:
        cfg, kl = RolloutCorrectionConfig(), 0.05
        expected = _reference(batches, logits, kl_coef=0.05)
    value, grads, sums = _ours(batches, logits, cfg, kl_coef=kl)
    assert value == pytest.approx(expected[0], rel=1e-5)
    assert sum(float(s["loss_sum"]) for s in sums) == pytest.approx(value, rel=1e-6)  # train/loss includes KL
    for got, want in zip(grads, expected[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    if case == "is_token+rejection+kl":
        rejected = sum(float(s["mismatch/rejected_frac_sum"]) for s in sums)
        assert 0 < rejected < sum(float(s["response_token_count"]) for s in sums)
        assert all("kl_sum" in s for s in sums)


def test_token_mean_microbatch_is_the_official_normaliser_and_differs_from_token_mean():
    batches, logits = _batches(row_tokens=14)
    sizes = [int(b.loss_mask.sum()) for b in batches]
    assert len(set(sizes)) > 1  # uneven micro-batches
    cfg = RolloutCorrectionConfig()
    official, official_grads, _ = _ours(batches, logits, cfg, mode="token-mean-microbatch")
    expected = _reference(batches, logits, mode="token-mean-microbatch")
    assert official == pytest.approx(expected[0], rel=1e-5)
    for got, want in zip(official_grads, expected[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
    global_mean, _, _ = _ours(batches, logits, cfg)
    assert abs(official - global_mean) > 1e-3 * abs(global_mean)


def test_statistics_on_tokens_with_nonzero_advantage_count_only_those():
    """maspo_active/... : the MASPO statistics over the tokens with A != 0 (what the gate can act on)."""
    from maspo_megatron.trainer.loss import finalize_metrics

    batches, logits = _batches()
    for batch in batches:  # as if from groups whose rewards were all equal: A = 0 on the first half of each row
        columns = torch.arange(batch.advantages.shape[1]).expand_as(batch.advantages)
        half = batch.advantages.shape[1] // 2
        batch.advantages = torch.where(columns < half, torch.zeros_like(batch.advantages), batch.advantages)
    gen = torch.Generator().manual_seed(5)
    for batch, raw in zip(batches, logits, strict=True):  # ratios spread around 1: some clipped, some gated
        lp = torch.log_softmax(raw, -1).gather(-1, batch.target[..., None])[..., 0].float()
        batch.old_log_probs = torch.where(batch.loss_mask, lp + 0.5 * torch.randn(lp.shape, generator=gen),
                                          batch.old_log_probs)
    _, _, sums = _ours(batches, logits, RolloutCorrectionConfig())
    total = {key: sum(float(s[key]) for s in sums) for key in sums[0]}
    metrics = finalize_metrics(total)
    tokens = active = clipped = 0
    for batch, raw in zip(batches, logits, strict=True):
        lp = torch.log_softmax(raw, -1).gather(-1, batch.target[..., None])[..., 0]
        for r, t in batch.loss_mask.nonzero().tolist():
            adv, ratio = float(batch.advantages[r, t]), math.exp(float(lp[r, t]) - float(batch.old_log_probs[r, t]))
            tokens += 1
            active += adv != 0
            clipped += (adv > 0 and ratio > 1.2) or (adv < 0 and ratio < 0.8)
    assert 0 < active < tokens and clipped > 0
    assert metrics["maspo/token_count"] == tokens and metrics["maspo_active/token_count"] == active
    assert metrics["maspo/ppo_clip_frac"] == pytest.approx(clipped / tokens)
    assert metrics["maspo_active/ppo_clip_frac"] == pytest.approx(clipped / active)
    # only A != 0 tokens are ever gated: the mean gate weight on gated tokens is the same in both
    assert metrics["maspo_active/gate_weight_mean_gated"] == pytest.approx(metrics["maspo/gate_weight_mean_gated"])
    assert not any(key.startswith("train/stats_active") for key in metrics)
