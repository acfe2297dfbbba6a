"""The loss terms that need collectives, split over CP x TP equal the unsplit computation: the rollout
correction's per-sample statistics (sequence IS, geometric rejection; CP all-reduce), BAPO's bound
choice (DP x CP all-reduce), the official normaliser's micro-batch token count (CP all-reduce),
Entropy-Advantage's entropy input and the KL term. Same harness as test_context_parallel_loss.py."""
import torch

from maspo_megatron.parallel.context import packed_zigzag_indices, zigzag_indices
from tests.helpers.multiproc import run_distributed
from tests.trainer.test_context_parallel_loss import CP, VOCAB, cp_samples

CASES = {
    "bapo/microbatch/seq-is/geometric-rs/kl": dict(
        loss="bapo", aggregation="token-mean-microbatch", kl_coef=0.05, kl_estimator="low_var_kl",
        correction=dict(is_level="sequence", is_threshold=1.5, rs_level="geometric", rs_upper=1.05)),
    "entropy_adv/token-mean/token-is/sequence-rs/kl": dict(
        loss="entropy_adv", aggregation="token-mean", kl_coef=0.1, kl_estimator="k1",
        correction=dict(is_level="token", is_threshold=1.2, rs_level="sequence", rs_upper=1.6)),
}


def _settings(case):
    from maspo_megatron.config.algorithm import AlgorithmConfig, RolloutCorrectionConfig
    from maspo_megatron.trainer.loss import LossSettings

    spec = CASES[case]
    algorithm = AlgorithmConfig(loss=spec["loss"], aggregation=spec["aggregation"], kl_coef=spec["kl_coef"],
                                kl_estimator=spec["kl_estimator"], entropy_coef=0.01,
                                rollout_correction=RolloutCorrectionConfig(**spec["correction"]))
    algorithm.bapo.rho_target = 0.45  # between the shares of the start and the end of the path
    return LossSettings.from_config(algorithm, temperature=0.8)


def _perturbed(batches):
    """pi_old (trainer) and pi_ref differ from the engine's log-probs, deterministically."""
    gen = torch.Generator().manual_seed(21)
    for batch in batches:
        noise = 0.2 * torch.randn(batch.old_log_probs.shape, generator=gen)
        batch.old_log_probs = torch.where(batch.loss_mask, batch.rollout_log_probs + noise, batch.old_log_probs)
        shift = 0.3 * torch.randn(batch.old_log_probs.shape, generator=gen)
        batch.ref_log_probs = torch.where(batch.loss_mask, batch.rollout_log_probs + shift, batch.ref_log_probs)
    return batches


def _cp_case():
    import torch.distributed as dist

    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.trainer.batch import pack_micro_batches
    from maspo_megatron.trainer.loss import compute_loss
    from maspo_megatron.trainer.loss_terms import kept_tokens

    dims = init_distributed(ParallelConfig(tp=2, cp=CP), seed=0)
    results = {}
    for per_sample in (False, True):
        batches = _perturbed(pack_micro_batches(cp_samples(), row_tokens=24, rows_per_micro_batch=1 if per_sample else 2,
                                                row_multiple=2 * CP, sample_multiple=2 * CP if per_sample else 1)[0])
        gen = torch.Generator().manual_seed(9)
        full_logits = [torch.randn(*b.tokens.shape, VOCAB, generator=gen) * 2 for b in batches]
        for case in CASES:
            settings = _settings(case)
            leaves = [x.clone().requires_grad_() for x in full_logits]
            ref_total, ref_rejected = 0.0, 0.0
            kept = kept_tokens(batches, settings.correction)
            for leaf, batch in zip(leaves, batches, strict=True):
                contribution, sums = compute_loss(leaf, batch, settings, micro_batch_count=len(batches), kept=kept)
                ref_total = ref_total + contribution
                ref_rejected += float(sums["mismatch/rejected_frac_sum"])
            ref_total.backward()
            split_leaves = [x.clone().requires_grad_() for x in full_logits]
            total, rejected = 0.0, 0.0
            shards = [b.cp_shard(CP, dims.cp_rank, per_sample=per_sample) for b in batches]
            split_kept = kept_tokens(shards, settings.correction, dims.cp_group, dims.cp, dims.dp_cp_group)
            assert torch.equal(split_kept.sample_token_count, kept.sample_token_count)
            for leaf, batch, shard_batch in zip(split_leaves, batches, shards, strict=True):
                if per_sample:
                    index = packed_zigzag_indices(batch.segment_bounds(0), CP, dims.cp_rank)
                else:
                    index = zigzag_indices(batch.tokens.shape[1], CP, dims.cp_rank)
                shard = leaf.index_select(1, index).chunk(dims.tp, dim=-1)[dims.tp_rank]
                contribution, sums = compute_loss(shard, shard_batch, settings, dims.tp_group, dims.cp_group, dims.cp,
                                                  dp_cp_group=dims.dp_cp_group, micro_batch_count=len(batches),
                                                  kept=split_kept)
                total = total + contribution
                rejected += float(sums["mismatch/rejected_frac_sum"])
            total.backward()
            values = torch.tensor([float(total.detach()), rejected], dtype=torch.float64)
            dist.all_reduce(values, group=dims.cp_group)
            errors = []
            for leaf, ref_leaf in zip(split_leaves, leaves, strict=True):
                grad = leaf.grad.clone()
                dist.all_reduce(grad, group=dims.tp_group)
                dist.all_reduce(grad, group=dims.cp_group)
                errors.append(float((grad - ref_leaf.grad).norm() / ref_leaf.grad.norm()))
            results[(per_sample, case)] = {"loss": (float(values[0]), float(ref_total)),
                                           "rejected": (float(values[1]), ref_rejected), "grad": max(errors)}
    dist.barrier()
    destroy_distributed()
    return results


def test_cp_pieces_of_the_loss_terms_sum_to_the_whole():
    results = run_distributed(_cp_case, 4, timeout_s=300)
    for rank, per_case in enumerate(results):
        assert len(per_case) == 2 * len(CASES)
        for key, result in per_case.items():
            got, expected = result["loss"]
            assert abs(got - expected) <= 1e-5 * abs(expected), (rank, key, got, expected)
            assert result["grad"] < 1e-5, (rank, key, result["grad"])
            got_rejected, expected_rejected = result["rejected"]
            assert got_rejected == expected_rejected and expected_rejected > 0, (rank, key, result["rejected"])
