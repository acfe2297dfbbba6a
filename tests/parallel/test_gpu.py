"""GPU checks of what CPU cannot run: the fused function on CUDA, and model-level context
parallel (Transformer Engine attention, THD packing, per-sample zig-zag split) against CP=1.

Skipped without CUDA (conftest) and, for CP, without 2 GPUs and Transformer Engine.
"""
import pytest
import torch

from tests.helpers.multiproc import run_distributed

pytestmark = pytest.mark.gpu


def test_fused_logprobs_entropy_on_cuda_matches_fp64():
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    gen = torch.Generator().manual_seed(0)
    full = torch.randn(300, 5000, generator=gen, dtype=torch.float64) * 3
    target = torch.randint(0, 5000, (300,), generator=gen)
    w_lp, w_ent = torch.randn(300, dtype=torch.float64), torch.randn(300, dtype=torch.float64)
    ref = full.clone().requires_grad_()
    log_probs = torch.log_softmax(ref / 0.7, -1)
    ref_lp = log_probs.gather(1, target[:, None]).squeeze(1)
    ref_ent = -(log_probs.exp() * log_probs).sum(-1)
    ((ref_lp * w_lp).sum() + (ref_ent * w_ent).sum()).backward()
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        logits = full.to("cuda", dtype).requires_grad_()
        log_prob, entropy = vocab_parallel_logprobs_entropy(logits, target.cuda(), None, temperature=0.7)
        ((log_prob * w_lp.cuda().float()).sum() + (entropy * w_ent.cuda().float()).sum()).backward()
        if dtype == torch.float32:
            assert torch.allclose(log_prob.double().cpu(), ref_lp, rtol=tol, atol=tol)
            assert torch.allclose(entropy.double().cpu(), ref_ent, rtol=tol, atol=tol)
        grad_err = (logits.grad.double().cpu() - ref.grad).norm() / ref.grad.norm()
        assert grad_err < tol, (dtype, float(grad_err))


def _samples_multiple_of(multiple):
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(2)
    samples = []
    for _ in range(6):
        total = multiple * int(torch.randint(2, 5, (1,), generator=gen))
        prompt_len = int(torch.randint(1, total - 1, (1,), generator=gen))
        ids = torch.randint(1, 96, (total,), generator=gen).tolist()
        old = (torch.randn(total - prompt_len, generator=gen) * 0.3 - 4.0).tolist()
        samples.append(TrainSample(ids[:prompt_len], ids[prompt_len:], float(torch.randn((), generator=gen)), old))
    return samples


def _cp_model_case():
    import torch.distributed as dist
    from megatron.core.packed_seq_params import PackedSeqParams

    from maspo_megatron.config import AlgorithmConfig
    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.trainer.batch import pack_micro_batches
    from maspo_megatron.trainer.loss import LossSettings, compute_loss
    from tests.helpers.tiny_gpt import build_tiny_gpt, named_local_params

    cp = dist.get_world_size() if dist.is_initialized() else 2
    samples = _samples_multiple_of(2 * cp)
    total = sum(len(s) for s in samples)
    (batches,) = pack_micro_batches(samples, row_tokens=total, rows_per_micro_batch=1)
    batch = batches[0].to("cuda")
    settings = LossSettings.from_config(AlgorithmConfig())
    results = {}
    for cp_size in (1, cp):
        dims = init_distributed(ParallelConfig(cp=cp_size), seed=3)
        (model,) = build_tiny_gpt(dims, transformer_engine=True)
        model = model.cuda()
        cu = batch.segment_bounds(0).cuda()
        shard = batch.cp_shard(cp_size, dims.cp_rank, per_sample=True) if cp_size > 1 else batch
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                                 cu_seqlens_kv_padded=cu, max_seqlen_q=int((cu[1:] - cu[:-1]).max()),
                                 max_seqlen_kv=int((cu[1:] - cu[:-1]).max()))
        logits = model(shard.tokens, shard.position_ids, None, packed_seq_params=params)
        contribution, _ = compute_loss(logits, shard, settings, dims.tp_group, dims.cp_group, dims.cp)
        contribution.backward()
        loss = contribution.detach().clone()
        grads = {name: p.grad.detach().clone() for name, p in named_local_params([model])}
        if cp_size > 1:
            dist.all_reduce(loss, group=dims.cp_group)
            for grad in grads.values():
                dist.all_reduce(grad, group=dims.cp_group)
        results[cp_size] = (float(loss), {k: v.cpu() for k, v in grads.items()})
        dist.barrier()
        destroy_distributed(keep_process_group=True)
    (loss1, grads1), (loss_cp, grads_cp) = results[1], results[cp]
    worst = max(float((grads_cp[k] - grads1[k]).norm() / grads1[k].norm().clamp_min(1e-12)) for k in grads1)
    return {"loss": (loss_cp, loss1), "grad": worst}


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="model-level context parallel needs 2 GPUs")
def test_model_level_context_parallel_matches_cp1():
    pytest.importorskip("transformer_engine")
    results = run_distributed(_cp_model_case, 2, timeout_s=600, device="cuda")
    for result in results:
        loss_cp, loss1 = result["loss"]
        assert abs(loss_cp - loss1) <= 1e-4 * abs(loss1)
        assert result["grad"] < 1e-3  # TE attention kernels reorder sums; fp32 params, bf16-free
