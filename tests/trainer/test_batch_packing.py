"""The packed micro-batch format and the packer (single process, no Megatron)."""
import pytest
import torch

from maspo_megatron.trainer.batch import TrainSample, pack_micro_batches


def _samples():
    return [
        TrainSample([1, 2, 3], [4, 5], 1.0, [-0.1, -0.2]),
        TrainSample([6], [7, 8, 9], [0.5, 0.25, -1.0], [-1.0, -2.0, -3.0]),
        TrainSample([10, 11], [], 2.0),
        TrainSample([12, 13, 14, 15], [16], -0.5, [-0.7]),
    ]


def test_alignment_masks_and_normalisers():
    (batches,) = pack_micro_batches(_samples(), row_tokens=8, rows_per_micro_batch=4)
    (batch,) = batches
    assert batch.global_token_count == 6 and batch.global_sample_count == 3
    assert batch.sample_token_count.tolist() == [2, 3, 0, 1]
    assert batch.local_token_count == 6
    # every response token is predicted exactly once, from the previous position of its sample
    for sample_id, sample in enumerate(_samples()):
        where = batch.loss_mask & (batch.sample_index == sample_id)
        assert batch.target[where].tolist() == list(sample.response_ids)
        # ... and the input token at that position is the one before it (last prompt token first)
        if sample.response_ids:
            expected_inputs = [sample.prompt_ids[-1], *sample.response_ids[:-1]]
            assert batch.tokens[where].tolist() == expected_inputs
        if sample.old_log_probs:
            assert torch.allclose(batch.old_log_probs[where], torch.tensor(sample.old_log_probs))
    adv = batch.advantages[batch.loss_mask & (batch.sample_index == 1)]
    assert adv.tolist() == [0.5, 0.25, -1.0]
    # positions restart at 0 for every sample
    for row in range(batch.tokens.shape[0]):
        seg = batch.segment_ids[row]
        for sample_id in seg.unique().tolist():
            if sample_id >= 0:
                pos = batch.position_ids[row][seg == sample_id]
                assert pos.tolist() == list(range(len(pos)))


def test_attention_is_block_diagonal_causal():
    (batches,) = pack_micro_batches(_samples(), row_tokens=16, rows_per_micro_batch=1)
    batch = batches[0]
    masked = batch.attention_mask()[0, 0]
    seg = batch.segment_ids[0]
    for i in range(seg.numel()):
        for j in range(seg.numel()):
            allowed = (i == j) or (j < i and seg[i] == seg[j] and seg[i] >= 0)
            assert bool(masked[i, j]) == (not allowed), (i, j)


def test_dp_split_equal_micro_batch_counts_and_shapes():
    samples = [TrainSample([1] * (1 + i % 3), [2] * (1 + i % 5), float(i)) for i in range(11)]
    per_rank = pack_micro_batches(samples, row_tokens=12, rows_per_micro_batch=2, dp_size=3, row_multiple=4,
                                  fixed_row_len=True, min_micro_batches=2)
    assert len(per_rank) == 3
    counts = {len(batches) for batches in per_rank}
    assert len(counts) == 1 and counts.pop() >= 2
    total = sum(b.local_token_count for batches in per_rank for b in batches)
    assert total == per_rank[0][0].global_token_count == sum(len(s.response_ids) for s in samples)
    assert all(b.tokens.shape[1] == 12 for batches in per_rank for b in batches)
    seen = sorted(int(s) for batches in per_rank for b in batches for s in b.segment_ids.unique() if s >= 0)
    assert seen == list(range(11))


def test_cp_shard_per_sample_keeps_padded_sample_boundaries():
    (batches,) = pack_micro_batches(_samples(), row_tokens=20, rows_per_micro_batch=1, row_multiple=4,
                                    sample_multiple=4)
    batch = batches[0]
    bounds = batch.segment_bounds(0)
    assert all(int(b) % 4 == 0 for b in bounds)
    halves = [batch.cp_shard(2, rank, per_sample=True) for rank in range(2)]
    assert sum(h.local_token_count for h in halves) == batch.local_token_count
    assert halves[0].global_token_count == batch.global_token_count


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="trainer.micro_batch_tokens"):
        pack_micro_batches([TrainSample([1] * 10, [2] * 10, 1.0)], row_tokens=8)
    with pytest.raises(ValueError, match="empty prompt"):
        pack_micro_batches([TrainSample([], [2], 1.0)], row_tokens=8)
    with pytest.raises(ValueError, match="old_log_probs: 1 values for 2"):
        pack_micro_batches([TrainSample([1], [2, 3], 1.0, [0.0])], row_tokens=8)
    with pytest.raises(ValueError, match="advantage: 3 values for 2"):
        pack_micro_batches([TrainSample([1], [2, 3], [1.0, 2.0, 3.0])], row_tokens=8)
