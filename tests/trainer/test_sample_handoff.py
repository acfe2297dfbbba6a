"""The driver -> ranks sample hand-off as flat tensors (trainer/sample_handoff.py), on gloo.

Every rank must see exactly the driver's samples (ids, lengths, log-probs, scalar and per-token
advantages, empty responses, missing log-probs), and must pack exactly the micro-batches the
driver's own samples pack into.
"""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.trainer.batch import TrainSample, pack_micro_batches
from maspo_megatron.trainer.sample_handoff import pack_samples, unpack_samples
from tests.helpers.multiproc import run_distributed

_PACK = dict(row_tokens=32, rows_per_micro_batch=1)


def _samples(copies: int = 1) -> list[TrainSample]:
    """Every kind of sample the driver makes (Python lists of ints / floats, as rollout_phase does),
    plus tensors (an engine may hand tensors over); `copies` repeats the set (more chunks)."""
    gen = torch.Generator().manual_seed(5)

    def ids(count: int) -> list[int]:
        return torch.randint(0, 151_936, (count,), generator=gen).tolist()

    def floats(count: int) -> list[float]:
        return torch.randn(count, generator=gen).tolist()  # fp32 values, as the engines report

    samples = [
        TrainSample(ids(5), ids(7), 0.1, floats(7)),                          # scalar advantage (not fp32-exact)
        TrainSample(ids(3), [], -1.25, None),                                 # empty response, no log-probs
        TrainSample(ids(4), ids(6), [0.5, -0.3, 1e-9, 2.0, -7.0, 0.0], floats(6)),  # per-token advantage
        TrainSample(ids(2), ids(3), 2.0 / 3.0, None),                         # log-probs missing
        TrainSample(ids(6), [], [], None),                                    # per-token, empty response
        TrainSample(torch.tensor(ids(4)), torch.tensor(ids(5)), torch.tensor(0.75, dtype=torch.float64),
                    torch.randn(5, generator=gen)),                           # tensors in
        TrainSample(ids(1), ids(9), -0.5, floats(9)),
        TrainSample(torch.tensor(ids(3), dtype=torch.int32), torch.tensor(ids(2), dtype=torch.int32), 1.5,
                    torch.tensor(floats(2))),                                  # int32 tensors, as an engine may keep them
    ]
    return samples * copies


def _plain(sample: TrainSample) -> dict:
    """A sample as plain Python values (what the test compares), with the container kinds."""
    def values(x):
        return None if x is None else (x.tolist() if isinstance(x, torch.Tensor) else list(x))

    advantage = sample.advantage
    scalar = not isinstance(advantage, (list, tuple)) and not (isinstance(advantage, torch.Tensor) and advantage.dim())
    return {"prompt": values(sample.prompt_ids), "response": values(sample.response_ids),
            "advantage": float(advantage) if scalar else values(advantage), "scalar": scalar,
            "log_probs": values(sample.old_log_probs)}


def _packed(samples: list[TrainSample], dp_size: int) -> list[list[dict]]:
    per_rank = pack_micro_batches(samples, dp_size=dp_size, **_PACK)
    fields = ("tokens", "position_ids", "segment_ids", "target", "loss_mask", "advantages", "old_log_probs",
              "sample_index", "sample_token_count")
    return [[{f: getattr(mb, f) for f in fields} for mb in rank] for rank in per_rank]


def _handoff_case(copies: int, chunk_ids: int) -> dict:
    from maspo_megatron.config import ParallelConfig
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.sample_handoff import broadcast_samples

    dims = init_distributed(ParallelConfig(), seed=1)
    given = _samples(copies) if dims.rank == 0 else None
    received = broadcast_samples(given, dims, chunk_ids=chunk_ids)  # small: several broadcasts in flight
    # a second hand-off in the same run (no state may leak between steps), smaller
    again = broadcast_samples(given[:2] if given else None, dims, chunk_ids=chunk_ids)
    return {"samples": [_plain(s) for s in received], "again": [_plain(s) for s in again],
            "id_dtype": None if dims.rank == 0 else received[0].prompt_ids.dtype,
            "packed": _packed(received, dims.dp)[dims.dp_rank]}


@pytest.mark.parametrize("world_size,copies,chunk_ids", [(2, 1, 1 << 21), (4, 1, 1 << 21), (2, 3, 40), (4, 2, 1)])
def test_every_rank_gets_the_drivers_samples_exactly(world_size, copies, chunk_ids):
    expected = [_plain(s) for s in _samples(copies)]
    # the trainer's precision for log-probs is fp32 (engines report fp32; the packer stores fp32)
    for item in expected:
        if item["log_probs"] is not None:
            item["log_probs"] = torch.tensor(item["log_probs"], dtype=torch.float32).tolist()
    reference_packing = _packed(_samples(copies), world_size)
    results = run_distributed(_handoff_case, world_size, copies, chunk_ids, timeout_s=240)
    for rank, result in enumerate(results):
        got = result["samples"]
        assert len(got) == len(expected), rank
        for index, (have, want) in enumerate(zip(got, expected, strict=True)):
            assert have == want, f"rank {rank}, sample {index}: {have} != {want}"
        assert result["again"] == expected[:2], rank
        if rank:
            assert result["id_dtype"] == torch.int32
        # the packer builds bit-identical micro-batches from the received samples
        want_batches = reference_packing[rank]
        assert len(result["packed"]) == len(want_batches)
        for have_mb, want_mb in zip(result["packed"], want_batches, strict=True):
            for field, tensor in want_mb.items():
                assert have_mb[field].dtype == tensor.dtype and torch.equal(have_mb[field], tensor), (rank, field)


def test_pack_unpack_round_trip_without_processes():
    samples = _samples()
    header, counts, ids, log_probs, advantages = pack_samples(samples)
    assert header.tolist() == [len(samples), ids.numel(), log_probs.numel(), advantages.numel()]
    # counted by hand from _samples(): prompt + response ids, log-probs, advantages
    assert ids.numel() == 12 + 3 + 10 + 5 + 6 + 9 + 10 + 5
    assert log_probs.numel() == 7 + 6 + 5 + 9 + 2 and advantages.numel() == 6 + 6 + 0
    assert [_plain(s) for s in unpack_samples(counts, ids, log_probs, advantages)][1:5] == \
        [_plain(s) for s in samples][1:5]


@pytest.mark.parametrize("bad,message", [
    (TrainSample([1], [2, 3], [0.5], None), r"TrainSample.advantage: 1 values for 2 response tokens \(sample 1\)"),
    (TrainSample([1], [2, 3], 0.5, [-1.0]), r"TrainSample.old_log_probs: 1 values for 2 response tokens \(sample 1\)"),
])
def test_inconsistent_sample_is_a_one_line_error(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_samples([TrainSample([1], [2], 1.0, None), bad])


@pytest.mark.parametrize("bad", [TrainSample([1, 2**31], [3], 1.0, None),
                                 TrainSample(torch.tensor([1]), torch.tensor([-2**31 - 1, 2]), 1.0, None)])
def test_token_id_beyond_int32_is_a_one_line_error(bad):
    message = r"TrainSample.prompt_ids/response_ids: a token id does not fit int32 \(sample 1\)"
    with pytest.raises(ValueError, match=message):
        pack_samples([TrainSample([1], [2], 1.0, None), bad])
