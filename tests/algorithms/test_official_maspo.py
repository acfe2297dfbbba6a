"""Our MASPO against the official implementation's loss lines, including its normaliser.

Facts restated from FlyTune/MASPO-RL at commit 22b468142df78210da85120b193d934de692dd1a (read, not
copied; the formulas below are written out independently in float64):

verl/trainer/ppo/core_algos.py, `compute_policy_loss` with `ratio_mode == "maspo"`:
    log_ratio = clamp(log_prob - old_log_prob, -20, 20);  ratio = exp(log_ratio)
    pos = (A > 0) & (ratio > 1);  neg = (A < 0) & (ratio < 1)
    p_old = exp(old_log_prob)
    base  = clamp(sigma_base / p_old ** alpha, sigma_base, sigma_high)
    sigma_neg = base * clamp(1 / (1 - beta_neg * A), adv_low, adv_high)
    sigma_pos = base * clamp(1 + beta_pos * A, adv_low, adv_high)
    w_x = exp(-(detach(ratio) - 1) ** 2 / 2 / sigma_x ** 2)          (x = pos, neg)
    ratio' = w_neg * ratio on neg tokens, w_pos * ratio on pos tokens, ratio elsewhere
    pg_losses = -A * ratio'          (the dual-clip case is computed but applied only in "ppo" mode)
    pg_loss = agg_loss(pg_losses, response_mask, "token-mean") = sum(pg_losses * mask) / sum(mask)
              -- called WITHOUT a global token count: the micro-batch's own count
verl/workers/actor/dp_actor.py, `update_policy`:
    gradient_accumulation = ppo_mini_batch_size // ppo_micro_batch_size_per_gpu
    loss = pg_loss / gradient_accumulation; loss.backward() per micro-batch; one optimizer step per
    mini-batch; FSDP averages the gradients over data-parallel ranks.
verl/trainer/config/actor/actor.yaml defaults: maspo_sigma_base 1, maspo_alpha 0.3,
    maspo_sigma_high 10, maspo_adv_low 0.1, maspo_adv_high 10, maspo_beta_neg 0.03, maspo_beta_pos 0.03,
    loss_agg_mode token-mean.
"""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.algorithms import aggregate_loss, policy_loss
from maspo_megatron.algorithms.losses.maspo import MaspoHyper

OFFICIAL_COMMIT = "22b468142df78210da85120b193d934de692dd1a"
OFFICIAL_DEFAULTS = dict(sigma_base=1.0, alpha=0.3, sigma_high=10.0, adv_low=0.1, adv_high=10.0, beta_pos=0.03,
                         beta_neg=0.03)


def official_pg_losses(log_prob, old_log_prob, advantages, *, sigma_base, alpha, sigma_high, adv_low, adv_high,
                       beta_pos, beta_neg):
    """The official per-token loss [B, T], float64, from the formulas in the module docstring."""
    ratio = torch.exp(torch.clamp(log_prob - old_log_prob, -20.0, 20.0))
    pos = (advantages > 0) & (ratio > 1)
    neg = (advantages < 0) & (ratio < 1)
    p_old = torch.exp(old_log_prob)
    base = torch.clamp(sigma_base / p_old**alpha, sigma_base, sigma_high)
    sigma_neg = base * torch.clamp(1 / (1 - beta_neg * advantages), adv_low, adv_high)
    sigma_pos = base * torch.clamp(1 + beta_pos * advantages, adv_low, adv_high)
    fixed = ratio.detach()
    w_neg = torch.exp(-((fixed - 1) ** 2) / 2 / sigma_neg**2)
    w_pos = torch.exp(-((fixed - 1) ** 2) / 2 / sigma_pos**2)
    gated = torch.where(neg, w_neg * ratio, ratio)
    gated = torch.where(pos, w_pos * gated, gated)
    return -advantages * gated


def official_step_loss(micro_batches, dp_size, hyper):
    """The loss whose gradient one official optimizer step applies: per rank, each micro-batch's own
    token-mean / gradient_accumulation, summed; then the mean over DP ranks. micro_batches: per rank, a
    list of (log_prob, old_log_prob, advantages, mask)."""
    per_rank = []
    for rank_batches in micro_batches:
        accumulation = len(rank_batches)
        total = 0.0
        for lp, old, adv, mask in rank_batches:
            losses = official_pg_losses(lp, old, adv, **hyper)
            total = total + (losses * mask).sum() / mask.sum() / accumulation
        per_rank.append(total)
    assert len(per_rank) == dp_size
    return sum(per_rank) / dp_size


def _micro_batches(seed, rows_per_micro=(3, 3, 3, 3), dp_size=2):
    """Uneven token counts (response lengths vary), DP ranks with the same number of micro-batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for rows in rows_per_micro:
        old = -torch.empty(rows, 24, dtype=torch.float64).exponential_(0.4, generator=gen)  # p_old down to ~1e-9
        lp = old + 0.8 * torch.randn(rows, 24, generator=gen, dtype=torch.float64)
        signs = torch.tensor([0.0] + [(-1.0) ** i for i in range(rows - 1)], dtype=torch.float64)[:, None]
        adv = (signs * 3 * torch.randn(rows, 1, generator=gen, dtype=torch.float64).abs()).expand(rows, 24).clone()
        lengths = torch.randint(2, 25, (rows,), generator=gen)
        mask = torch.arange(24)[None] < lengths[:, None]
        out.append((lp, old, adv, mask))
    per = len(out) // dp_size
    return [out[r * per:(r + 1) * per] for r in range(dp_size)]


def test_official_defaults_are_ours():
    assert OFFICIAL_DEFAULTS == {k: v for k, v in vars(MaspoHyper()).items() if k in OFFICIAL_DEFAULTS}
    assert MaspoHyper().dual_clip_c is None and MaspoHyper().gate_grad == "detached"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hyper", [OFFICIAL_DEFAULTS, dict(OFFICIAL_DEFAULTS, sigma_base=2.0, alpha=0.5,
                                                            beta_pos=0.2, beta_neg=0.4, adv_high=3.0)])
def test_token_loss_and_official_normaliser_match_in_value_and_gradient(seed, hyper):
    per_rank = _micro_batches(seed)
    leaves = [[(lp.clone().requires_grad_(), old, adv, mask) for lp, old, adv, mask in rank] for rank in per_rank]
    official = official_step_loss(leaves, len(leaves), hyper)
    official.backward()
    official_grads = [lp.grad.clone() for rank in leaves for lp, *_ in rank]

    count = sum(len(rank) for rank in per_rank)  # micro-batches of the step over all DP ranks
    ours_total = 0.0
    ours_leaves = []
    for rank in per_rank:
        for lp, old, adv, mask in rank:
            leaf = lp.clone().requires_grad_()
            ours_leaves.append(leaf)
            loss_tok, metrics = policy_loss("maspo", leaf, old, adv, mask, **hyper)
            reference_tok = official_pg_losses(lp, old, adv, **hyper)
            torch.testing.assert_close(loss_tok[mask], reference_tok[mask], rtol=1e-10, atol=1e-12)
            assert metrics["gated_pos"].any() and metrics["gated_neg"].any()
            ours_total = ours_total + aggregate_loss(loss_tok, mask, "token-mean-microbatch", micro_batch_count=count)
    ours_total.backward()
    assert float(ours_total.detach()) == pytest.approx(float(official.detach()), rel=1e-10)
    for ours, theirs in zip([leaf.grad for leaf in ours_leaves], official_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12)


def test_global_token_mean_differs_from_the_official_normaliser_on_uneven_micro_batches():
    per_rank = _micro_batches(3)
    flat = [mb for rank in per_rank for mb in rank]
    sizes = [int(mask.sum()) for *_, mask in flat]
    assert len(set(sizes)) > 1
    official = float(official_step_loss(per_rank, len(per_rank), OFFICIAL_DEFAULTS))
    total_tokens = sum(sizes)
    ours_global = sum(
        float(aggregate_loss(policy_loss("maspo", lp, old, adv, mask)[0], mask, "token-mean",
                             global_token_count=total_tokens))
        for lp, old, adv, mask in flat
    )
    assert abs(ours_global - official) > 1e-3 * abs(official)
    # equal micro-batches (same token count everywhere) make the two normalisers agree
    equal = [[(lp, old, adv, torch.ones_like(mask)) for lp, old, adv, mask in rank] for rank in per_rank]
    official_equal = float(official_step_loss(equal, len(equal), OFFICIAL_DEFAULTS))
    n = sum(int(m.sum()) for rank in equal for *_, m in rank)
    ours_equal = sum(float(aggregate_loss(policy_loss("maspo", lp, old, adv, m)[0], m, "token-mean",
                                          global_token_count=n)) for rank in equal for lp, old, adv, m in rank)
    assert ours_equal == pytest.approx(official_equal, rel=1e-10)
