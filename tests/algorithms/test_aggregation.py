"""Aggregation: the contributions of micro-batches, data-parallel shards, packed rows and
context-parallel halves of samples add up to the whole-batch loss, for every layout-invariant
mode; the layout-dependent official normaliser on its own definition."""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.algorithms import AGGREGATION_MODES, LAYOUT_DEPENDENT_MODES, aggregate_loss

NORM_LENGTH = 32
# token-mean-microbatch is excluded from the invariance tests: its result depends on the cut by design.
LAYOUT_INVARIANT = [mode for mode in AGGREGATION_MODES if mode not in LAYOUT_DEPENDENT_MODES]


def _samples(seed: int, count: int = 7, max_len: int = 13):
    """Per-sample token losses (float64 lists), lengths 1..max_len."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (count,), generator=gen).tolist()
    return [torch.randn(n, generator=gen, dtype=torch.float64).tolist() for n in lengths]


def _expected(samples, mode):
    """Whole-batch loss straight from the definitions, in plain Python."""
    tokens = sum(len(s) for s in samples)
    total = sum(sum(s) for s in samples)
    if mode in ("token-mean", "token-mean-microbatch"):  # the whole batch as ONE micro-batch
        return total / tokens
    if mode == "seq-mean-token-mean":
        return sum(sum(s) / len(s) for s in samples) / len(samples)
    if mode == "seq-mean-token-sum":
        return total / len(samples)
    return total / (len(samples) * NORM_LENGTH)


def _rows(samples, width=16):
    """One sample per row, right-padded (padding holds NaN: it must never leak)."""
    loss = torch.full((len(samples), width), float("nan"), dtype=torch.float64)
    mask = torch.zeros(len(samples), width, dtype=torch.bool)
    for i, s in enumerate(samples):
        loss[i, : len(s)] = torch.tensor(s, dtype=torch.float64)
        mask[i, : len(s)] = True
    return loss, mask


def _global(samples):
    return dict(
        global_token_count=sum(len(s) for s in samples),
        global_sample_count=len(samples),
        norm_length=NORM_LENGTH,
    )


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_whole_batch_matches_definition(mode):
    samples = _samples(0)
    loss, mask = _rows(samples)
    got = aggregate_loss(loss, mask, mode, **_global(samples))
    assert got.item() == pytest.approx(_expected(samples, mode), rel=1e-12)
    # None normalisers: the shard is the whole batch
    local = aggregate_loss(loss, mask, mode, norm_length=NORM_LENGTH)
    assert local.item() == pytest.approx(_expected(samples, mode), rel=1e-12)


@pytest.mark.parametrize("mode", LAYOUT_INVARIANT)
@pytest.mark.parametrize("cuts", [[7], [1, 6], [3, 2, 2], [1] * 7])
def test_micro_batches_and_shards_sum_to_whole(mode, cuts):
    samples = _samples(1)
    loss, mask = _rows(samples)
    whole = aggregate_loss(loss, mask, mode, **_global(samples))
    parts, start = [], 0
    for size in cuts:
        rows = slice(start, start + size)
        parts.append(aggregate_loss(loss[rows], mask[rows], mode, **_global(samples)))
        start += size
    torch.testing.assert_close(sum(parts), whole, rtol=1e-12, atol=0)


def _pack(samples, width=16):
    """Greedy packing of whole samples into rows: (loss, mask, sample_index)."""
    rows, current = [], []
    for index, s in enumerate(samples):
        if sum(len(samples[i]) for i in current) + len(s) > width:
            rows.append(current)
            current = []
        current.append(index)
    rows.append(current)
    loss = torch.zeros(len(rows), width, dtype=torch.float64)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    sample_index = torch.full((len(rows), width), -1, dtype=torch.long)  # -1 on padding
    for r, members in enumerate(rows):
        col = 0
        for index in members:
            n = len(samples[index])
            loss[r, col : col + n] = torch.tensor(samples[index], dtype=torch.float64)
            mask[r, col : col + n] = True
            sample_index[r, col : col + n] = index
            col += n
    return loss, mask, sample_index


@pytest.mark.parametrize("mode", LAYOUT_INVARIANT)
def test_packed_rows_equal_one_sample_per_row(mode):
    samples = _samples(2, count=9, max_len=7)
    loss, mask, sample_index = _pack(samples)
    assert loss.shape[0] < len(samples)  # several samples share a row
    counts = torch.tensor([len(s) for s in samples])
    packed = aggregate_loss(
        loss, mask, mode, sample_index=sample_index, sample_token_count=counts, **_global(samples)
    )
    assert packed.item() == pytest.approx(_expected(samples, mode), rel=1e-12)
    # without the global per-sample counts, a packed shard that holds whole samples counts them itself
    local = aggregate_loss(loss, mask, mode, sample_index=sample_index, norm_length=NORM_LENGTH)
    assert local.item() == pytest.approx(_expected(samples, mode), rel=1e-12)


@pytest.mark.parametrize("mode", LAYOUT_INVARIANT)
def test_samples_split_across_context_parallel_ranks(mode):
    """Each sample's tokens are cut between 2 CP ranks (load-balanced zig-zag style chunks 0,3 | 1,2);
    each rank passes the samples' TOTAL token counts: the two contributions add up to the whole."""
    samples = _samples(3, count=5, max_len=13)
    loss, mask = _rows(samples, width=16)
    sample_index = torch.arange(len(samples)).unsqueeze(1).expand(-1, 16)
    counts = mask.sum(-1)
    chunks = torch.arange(16).reshape(4, 4)
    rank_cols = [torch.cat([chunks[0], chunks[3]]), torch.cat([chunks[1], chunks[2]])]
    contributions = [
        aggregate_loss(
            loss[:, cols], mask[:, cols], mode, sample_index=sample_index[:, cols],
            sample_token_count=counts, **_global(samples),
        )
        for cols in rank_cols
    ]
    assert sum(contributions).item() == pytest.approx(_expected(samples, mode), rel=1e-12)


def test_config_offers_exactly_these_modes():
    from maspo_megatron.config import ConfigError, load_config

    for mode in AGGREGATION_MODES:
        assert load_config(None, [f"algorithm.aggregation={mode}"]).algorithm.aggregation == mode
    with pytest.raises(ConfigError, match="algorithm.aggregation: 'token-sum' is not one of \\['token-mean'"):
        load_config(None, ["algorithm.aggregation=token-sum"])
    assert set(LAYOUT_DEPENDENT_MODES) == {"token-mean-microbatch"}


def test_token_mean_microbatch_is_the_official_normaliser():
    """Uneven micro-batches over 2 DP ranks: each micro-batch's own token mean, / number of micro-batches
    in the step (all ranks); NOT the global token mean (a layout-invariant mode would give that)."""
    samples = _samples(5, count=6, max_len=13)
    loss, mask = _rows(samples)
    cuts = [[0], [1, 2], [3, 4, 5]]  # rank 0: micro-batches 0, 1; rank 1: micro-batch 2 (uneven sizes)
    contributions = [
        aggregate_loss(loss[rows], mask[rows], "token-mean-microbatch", micro_batch_count=len(cuts)) for rows in cuts
    ]
    expected = sum(sum(sum(samples[i]) for i in rows) / sum(len(samples[i]) for i in rows) for rows in cuts) / 3
    assert sum(contributions).item() == pytest.approx(expected, rel=1e-12)
    token_mean = sum(sum(s) for s in samples) / sum(len(s) for s in samples)
    assert abs(expected - token_mean) > 1e-3 * abs(token_mean)  # the cut matters
    # a micro-batch split over CP ranks passes its whole token count: the halves add up
    cols = [torch.arange(0, 8), torch.arange(8, 16)]
    rows = cuts[2]
    halves = [aggregate_loss(loss[rows][:, c], mask[rows][:, c], "token-mean-microbatch",
                             micro_batch_token_count=int(mask[rows].sum()), micro_batch_count=3) for c in cols]
    torch.testing.assert_close(sum(halves), contributions[2], rtol=1e-12, atol=0)


def test_gradient_weights_per_token():
    """d contribution / d loss_t is the token's global weight: 1/N (token-mean), 1/(S n_s) (seq-mean-token-mean)."""
    samples = _samples(4, count=3)
    loss, mask = _rows(samples)
    loss = torch.nan_to_num(loss).requires_grad_()
    aggregate_loss(loss, mask, "seq-mean-token-mean", global_sample_count=10).backward()
    expected = mask.double() / (10 * mask.sum(-1, keepdim=True).double())
    torch.testing.assert_close(loss.grad, expected, rtol=1e-12, atol=0)
    loss.grad = None
    aggregate_loss(loss, mask, "token-mean", global_token_count=100).backward()
    torch.testing.assert_close(loss.grad, mask.double() / 100, rtol=1e-12, atol=0)


def test_tensor_normalisers_and_dtype():
    loss = torch.ones(2, 3, dtype=torch.bfloat16)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = aggregate_loss(loss, mask, "token-mean", global_token_count=torch.tensor(6))
    assert out.dtype == torch.float32 and out.item() == pytest.approx(0.5)
    empty = aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), "token-mean")
    assert empty.item() == 0.0  # a shard without tokens contributes 0, no 0/0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(mode="mean"), "unknown mode 'mean'"),
        (dict(mode="seq-mean-token-sum-norm", global_sample_count=2), "norm_length"),
        (dict(mode="token-mean", global_token_count=0), "global_token_count"),
        (dict(mode="token-mean-microbatch", micro_batch_count=0), "micro_batch_count"),
        (dict(mode="seq-mean-token-sum", global_sample_count=-1), "global_sample_count"),
        (dict(mode="seq-mean-token-mean", sample_index=torch.tensor([[0, 3]]), sample_token_count=torch.tensor([1, 1])),
         "sample_token_count"),
        (dict(mode="seq-mean-token-mean", sample_index=torch.tensor([0, 1])), "sample_index has shape"),
        (dict(mode="seq-mean-token-mean", sample_token_count=torch.tensor([2])), "needs sample_index"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        aggregate_loss(torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), **kwargs)
