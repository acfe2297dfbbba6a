"""Tokens rejected by the rollout correction leave the loss's token counts (as in verl: its modified
`response_mask` is the mask `agg_loss` divides by), while the counts stay those of the whole mini-batch,
so the loss is the same however the batch is cut into micro-batches and data-parallel ranks.

Two samples, on-policy (pi_theta = pi_old, so each GRPO token loss is exactly -A): sample 0 has
A = 1 and 3 response tokens, sample 1 has A = -2 and 2. The engine's log-prob of sample 0's first
token is 1 below the trainer's (ratio e > rs_upper = 2): token-level rejection drops that token,
sequence-level rejection drops sample 0 (its summed log-ratio is 1). The expected values below are
that arithmetic, written out by hand.
"""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.config.algorithm import AlgorithmConfig, RolloutCorrectionConfig
from maspo_megatron.trainer.batch import TrainSample, pack_micro_batches
from maspo_megatron.trainer.loss import LossSettings, compute_loss
from maspo_megatron.trainer.loss_terms import kept_tokens

VOCAB = 17
SAMPLES = [TrainSample([1, 2], [3, 4, 5], 1.0), TrainSample([6], [7, 8], -2.0)]
# layout name -> pack_micro_batches arguments; "dp2" packs for two data-parallel ranks
LAYOUTS = {"one micro-batch": dict(row_tokens=16), "two micro-batches": dict(row_tokens=5),
           "dp2": dict(row_tokens=5, dp_size=2)}

# kept tokens: sample 0 keeps 2 tokens (loss -1 each), sample 1 keeps 2 (loss +2 each): sum 2 over 4 tokens
TOKEN_LEVEL = {"token-mean": 2 / 4,                          # before: 2 / 5 (rejected token still counted)
               "seq-mean-token-mean": (-2 / 2 + 4 / 2) / 2,  # before: (-2 / 3 + 4 / 2) / 2
               "seq-mean-token-sum": 2 / 2}                  # sample counts are unchanged
# sample 0 rejected whole: only sample 1's 2 tokens (+2 each) remain; it still counts as a sample
SEQUENCE_LEVEL = {"token-mean": 4 / 2,                       # before: 4 / 5
                  "seq-mean-token-mean": (0 + 4 / 2) / 2,    # before: the same (sample 0 adds 0 either way)
                  "seq-mean-token-sum": 4 / 2}


def _micro_batches(layout: str):
    """Every rank's micro-batches of the layout (a DP all-reduce over them = their sum in one process)."""
    gen = torch.Generator().manual_seed(3)
    batches = [mb for per_rank in pack_micro_batches(SAMPLES, **LAYOUTS[layout]) for mb in per_rank]
    logits = []
    for batch in batches:
        raw = torch.randn(*batch.tokens.shape, VOCAB, generator=gen, dtype=torch.float64)
        trainer = torch.log_softmax(raw, -1).gather(-1, batch.target[..., None])[..., 0].float()
        mask = batch.loss_mask
        batch.old_log_probs = torch.where(mask, trainer, batch.old_log_probs)  # pi_old = pi_theta
        first_of_sample0 = mask & (batch.sample_index == 0)
        if first_of_sample0.any():
            row, col = first_of_sample0.nonzero()[0].tolist()
            first_of_sample0 = torch.zeros_like(mask)
            first_of_sample0[row, col] = True
        shift = torch.where(first_of_sample0, torch.ones_like(trainer), torch.zeros_like(trainer))
        batch.rollout_log_probs = torch.where(mask, trainer - shift, batch.rollout_log_probs)
        logits.append(raw)
    return batches, logits


def _loss(layout: str, aggregation: str, rs_level: str) -> float:
    batches, logits = _micro_batches(layout)
    correction = RolloutCorrectionConfig(rs_level=rs_level, rs_upper=2.0)
    settings = LossSettings.from_config(AlgorithmConfig(loss="grpo", aggregation=aggregation,
                                                        rollout_correction=correction))
    kept = kept_tokens(batches, correction)
    return sum(float(compute_loss(x, b, settings, micro_batch_count=len(batches), kept=kept)[0])
               for x, b in zip(logits, batches, strict=True))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("rs_level,expected", [("token", TOKEN_LEVEL), ("sequence", SEQUENCE_LEVEL)])
def test_rejected_tokens_leave_the_denominator_at_every_layout(layout, rs_level, expected):
    for aggregation, value in expected.items():
        assert _loss(layout, aggregation, rs_level) == pytest.approx(value, rel=1e-6), (layout, aggregation)


def test_official_normaliser_divides_each_micro_batch_by_its_kept_tokens():
    """token-mean-microbatch (verl's legacy per-micro-batch `agg_loss`): the kept tokens of each micro-batch."""
    assert _loss("one micro-batch", "token-mean-microbatch", "token") == pytest.approx(2 / 4, rel=1e-6)
    batches, _ = _micro_batches("two micro-batches")
    assert [sorted(set(b.sample_index[b.loss_mask].tolist())) for b in batches] == [[0], [1]]
    # (-2 / 2 kept tokens of sample 0 + 4 / 2 of sample 1) / 2 micro-batches; before: (-2 / 3 + 4 / 2) / 2
    assert _loss("two micro-batches", "token-mean-microbatch", "token") == pytest.approx((-1 + 2) / 2, rel=1e-6)


def test_kept_counts_per_sample_and_a_loss_without_them_is_refused():
    batches, logits = _micro_batches("two micro-batches")
    kept = kept_tokens(batches, RolloutCorrectionConfig(rs_level="token", rs_upper=2.0))
    assert kept.sample_token_count.tolist() == [2.0, 2.0] and float(kept.token_count) == 4.0
    assert kept_tokens(batches, RolloutCorrectionConfig(is_level="token")) is None  # nothing rejected
    settings = LossSettings.from_config(AlgorithmConfig(
        loss="grpo", rollout_correction=RolloutCorrectionConfig(rs_level="token")))
    with pytest.raises(ValueError, match="rs_level"):
        compute_loss(logits[0], batches[0], settings)


def test_gspo_sequence_ratio_is_the_mean_over_kept_tokens():
    """GSPO's whole-sample log-ratio averages over the tokens the correction kept (verl's GSPO loss takes
    its mean over the modified response mask). Sample 0's rejected first token is made off-policy
    (log pi_theta - log pi_old = 0.6 there, 0 on its two kept tokens): its mean over kept tokens is 0;
    over all three tokens it would be 0.2."""
    from maspo_megatron.trainer.loss_terms import loss_inputs, rollout_correction

    batches, logits = _micro_batches("one micro-batch")
    batch, raw = batches[0], logits[0]
    log_prob = torch.log_softmax(raw, -1).gather(-1, batch.target[..., None])[..., 0].float()
    first = batch.loss_mask & (batch.sample_index == 0)
    row, col = first.nonzero()[0].tolist()
    batch.old_log_probs[row, col] -= 0.6
    batch.rollout_log_probs[row, col] = batch.old_log_probs[row, col] - 1.0  # still rejected: ratio e > 2
    correction = RolloutCorrectionConfig(rs_level="token", rs_upper=2.0)
    corrected = rollout_correction(batch, correction, None, 1)
    assert int(corrected.mask.sum()) == 4 and not corrected.mask[row, col]
    kept = kept_tokens(batches, correction)
    extra = loss_inputs("gspo", {}, log_prob, log_prob, corrected.advantages, corrected.mask, batch, kept=kept)
    seq = extra["seq_log_ratio"][corrected.mask]
    assert torch.allclose(seq, torch.zeros_like(seq), atol=1e-6), seq
    # without rejection the same sample averages over all 3 tokens: 0.6 / 3
    full = loss_inputs("gspo", {}, log_prob, log_prob, batch.advantages, batch.loss_mask, batch)["seq_log_ratio"]
    assert float(full[row, col]) == pytest.approx(0.2, abs=1e-6)
