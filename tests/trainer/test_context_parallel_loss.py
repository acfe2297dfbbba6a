"""Context parallel at the loss level (CP attention needs Transformer Engine: model-level CP is a
GPU test). The per-token inputs of a packed batch are split zig-zag over CP ranks (whole rows, and
per packed sample as THD does), and vocab-sharded over TP ranks; the CP pieces of the loss, its
gradient w.r.t. the logits and the reduced statistics must equal the unsplit computation.
"""
import math

import torch

from maspo_megatron.algorithms import AGGREGATION_MODES, LAYOUT_DEPENDENT_MODES
from maspo_megatron.parallel.context import merge_from_cp, packed_zigzag_indices, zigzag_indices
from tests.helpers.multiproc import run_distributed

# every mode whose result does not depend on the cut (the layout-dependent one is checked in test_loss_terms)
AGGREGATIONS = tuple(mode for mode in AGGREGATION_MODES if mode not in LAYOUT_DEPENDENT_MODES)
VOCAB = 40
CP = 2


def test_zigzag_indices_match_megatrons_layout():
    # L=8, cp=2: chunks of 2; rank 0 keeps chunks 0 and 3, rank 1 keeps chunks 1 and 2.
    assert zigzag_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert zigzag_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    # per packed sample: samples [0, 4) and [4, 12)
    cu = torch.tensor([0, 4, 12])
    assert packed_zigzag_indices(cu, 2, 0).tolist() == [0, 3, 4, 5, 10, 11]
    assert packed_zigzag_indices(cu, 2, 1).tolist() == [1, 2, 6, 7, 8, 9]
    parts = [torch.arange(12)[None].index_select(1, packed_zigzag_indices(cu, 2, r)) for r in range(2)]
    merged = merge_from_cp(parts, [packed_zigzag_indices(cu, 2, r) for r in range(2)], 12)
    assert merged.tolist() == [list(range(12))]


def test_zigzag_rejects_bad_lengths():
    import pytest

    with pytest.raises(ValueError, match="multiple of 2\\*cp = 4"):
        zigzag_indices(6, 2, 0)
    with pytest.raises(ValueError, match="pad each sample"):
        packed_zigzag_indices(torch.tensor([0, 3, 8]), 2, 0)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        zigzag_indices(8, 2, 2)


def cp_samples():
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(5)
    out = []
    for _ in range(9):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist()
        response_len = int(torch.randint(1, 11, (1,), generator=gen))
        response = torch.randint(1, VOCAB, (response_len,), generator=gen).tolist()
        old = (torch.randn(response_len, generator=gen) * 0.5 - 2.5).tolist()
        out.append(TrainSample(prompt, response, float(torch.randn((), generator=gen)), old))
    return out


def _settings(loss, mode):
    from maspo_megatron.config import AlgorithmConfig
    from maspo_megatron.trainer.loss import LossSettings

    return LossSettings.from_config(AlgorithmConfig(loss=loss, aggregation=mode, norm_length=12, entropy_coef=0.01),
                                    temperature=0.8)


def _cp_case():
    import torch.distributed as dist

    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.parallel.metrics import reduce_sums
    from maspo_megatron.trainer.batch import pack_micro_batches
    from maspo_megatron.trainer.loss import compute_loss, finalize_metrics

    dims = init_distributed(ParallelConfig(tp=2, cp=CP), seed=0)
    results = {}
    for per_sample in (False, True):
        batches = pack_micro_batches(cp_samples(), row_tokens=24, rows_per_micro_batch=1 if per_sample else 2,
                                     row_multiple=2 * CP, sample_multiple=2 * CP if per_sample else 1)[0]
        gen = torch.Generator().manual_seed(9)
        full_logits = [torch.randn(*b.tokens.shape, VOCAB, generator=gen) * 2 for b in batches]
        for loss in ("maspo", "gspo"):
            for mode in AGGREGATIONS:
                settings = _settings(loss, mode)
                # the unsplit computation (full vocabulary, whole rows), in every process
                leaves = [x.clone().requires_grad_() for x in full_logits]
                ref_total, ref_sums = 0.0, []
                for leaf, batch in zip(leaves, batches, strict=True):
                    contribution, sums = compute_loss(leaf, batch, settings)
                    ref_total = ref_total + contribution
                    ref_sums.append(sums)
                ref_total.backward()
                # the CP x TP split computation
                split_leaves = [x.clone().requires_grad_() for x in full_logits]
                total, split_sums = 0.0, []
                for leaf, batch in zip(split_leaves, batches, strict=True):
                    if per_sample:
                        index = packed_zigzag_indices(batch.segment_bounds(0), CP, dims.cp_rank)
                    else:
                        index = zigzag_indices(batch.tokens.shape[1], CP, dims.cp_rank)
                    shard = leaf.index_select(1, index).chunk(dims.tp, dim=-1)[dims.tp_rank]
                    contribution, sums = compute_loss(shard, batch.cp_shard(CP, dims.cp_rank, per_sample=per_sample),
                                                      settings, dims.tp_group, dims.cp_group, dims.cp)
                    total = total + contribution
                    split_sums.append(sums)
                total.backward()
                loss_value = total.detach().clone()
                dist.all_reduce(loss_value, group=dims.cp_group)
                grad_errors = []
                for leaf, ref_leaf in zip(split_leaves, leaves, strict=True):
                    grad = leaf.grad.clone()
                    dist.all_reduce(grad, group=dims.tp_group)  # each TP rank holds its vocab slice
                    dist.all_reduce(grad, group=dims.cp_group)  # each CP rank holds its positions
                    grad_errors.append(float((grad - ref_leaf.grad).norm() / ref_leaf.grad.norm()))
                metrics = finalize_metrics(reduce_sums(split_sums, dims))
                key = (per_sample, loss, mode)
                results[key] = {"loss": (float(loss_value), float(ref_total)), "grad": max(grad_errors)}
                if metrics is not None:
                    ref_metrics = finalize_metrics({k: float(sum(s[k] for s in ref_sums)) for k in ref_sums[0]})
                    results[key]["metrics"] = (metrics, ref_metrics)
    dist.barrier()
    destroy_distributed()
    return results


def test_cp_pieces_sum_to_the_whole():
    results = run_distributed(_cp_case, 4, timeout_s=300)
    for rank, per_case in enumerate(results):
        assert len(per_case) == 2 * 2 * len(AGGREGATIONS)
        for key, result in per_case.items():
            got, expected = result["loss"]
            assert abs(got - expected) <= 1e-5 * abs(expected), (rank, key, got, expected)
            assert result["grad"] < 1e-5, (rank, key, result["grad"])
            if rank == 0:
                metrics, ref_metrics = result["metrics"]
                assert set(metrics) == set(ref_metrics)
                for name, value in ref_metrics.items():
                    if math.isnan(value):
                        assert math.isnan(metrics[name]), name
                    else:
                        assert abs(metrics[name] - value) <= 1e-5 * max(abs(value), 1e-6), (key, name)
            else:
                assert "metrics" not in result
    # GSPO's sequence ratio needs the CP all-reduce: its loss differs from MASPO's
    assert results[0][(True, "gspo", "token-mean")]["loss"] != results[0][(True, "maspo", "token-mean")]["loss"]
