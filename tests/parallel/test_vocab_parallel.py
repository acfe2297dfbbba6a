"""vocab_parallel_logprobs_entropy vs an fp64 full-vocabulary reference, at TP 1, 2 and 4.

One 4-rank launch checks every TP size (TP 2 through two sub-groups), temperatures, chunking and
the partial-gradient paths. The loss whose gradient is checked is ONE copy of a function of the
TP-replicated outputs, as with Megatron's vocab_parallel_cross_entropy.
"""
import torch

from tests.helpers.multiproc import run_distributed
from tests.parallel._logprob_reference import reference, rel_err

T, V = 37, 1000  # V divisible by 1, 2 and 4




def _vocab_case():
    import torch.distributed as dist

    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    groups = {1: None, 4: dist.group.WORLD}
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    groups[2] = pair_groups[rank // 2]
    generator = torch.Generator().manual_seed(11)
    full = torch.randn(T, V, generator=generator, dtype=torch.float64) * 4.0
    full[3] += 30.0  # a peaked row
    target = torch.randint(0, V, (T,), generator=generator)
    w_lp = torch.randn(T, generator=generator, dtype=torch.float64)
    w_ent = torch.randn(T, generator=generator, dtype=torch.float64)
    worst = {}
    for tp, group in groups.items():
        tp_rank = rank % tp
        shard = full.chunk(tp, dim=1)[tp_rank]
        for temperature in (1.0, 0.6):
            for chunk_size in (None, 5):
                for use_lp, use_ent in ((True, True), (True, False), (False, True)):
                    ref_lp, ref_ent, ref_grad = reference(full, target, temperature,
                                                           w_lp if use_lp else None, w_ent if use_ent else None)
                    logits = shard.float().clone().requires_grad_()
                    before = logits.detach().clone()
                    log_prob, entropy = vocab_parallel_logprobs_entropy(
                        logits, target, group, temperature=temperature, chunk_size=chunk_size)
                    assert log_prob.dtype == torch.float32 and entropy.dtype == torch.float32
                    loss = 0.0
                    if use_lp:
                        loss = loss + (log_prob * w_lp.float()).sum()
                    if use_ent:
                        loss = loss + (entropy * w_ent.float()).sum()
                    loss.backward()
                    assert torch.equal(logits.detach(), before), "input modified"
                    key = (tp, temperature, chunk_size, use_lp, use_ent)
                    errors = {
                        "log_prob": rel_err(log_prob, ref_lp),
                        "entropy": rel_err(entropy, ref_ent),
                        "grad": rel_err(logits.grad, ref_grad.chunk(tp, dim=1)[tp_rank]),
                        "grad_max_abs": float((logits.grad.double() - ref_grad.chunk(tp, dim=1)[tp_rank]).abs().max()
                                              / ref_grad.abs().max()),
                    }
                    worst[key] = errors
    # bf16 logits: values computed in fp32 from the bf16 inputs, gradient returned in bf16.
    shard = full.chunk(4, dim=1)[rank].to(torch.bfloat16).requires_grad_()
    log_prob, entropy = vocab_parallel_logprobs_entropy(shard, target, dist.group.WORLD)
    ref_lp, ref_ent, ref_grad = reference(full.to(torch.bfloat16).double(), target, 1.0, w_lp, None)
    log_prob.mul(w_lp.float()).sum().backward()
    bf16 = {"log_prob": rel_err(log_prob, ref_lp), "grad_dtype": str(shard.grad.dtype),
            "grad": rel_err(shard.grad, ref_grad.chunk(4, dim=1)[rank])}
    dist.barrier()
    return {"fp32": worst, "bf16": bf16}


def test_matches_fp64_reference_at_tp_1_2_4():
    results = run_distributed(_vocab_case, 4, timeout_s=180)
    for rank, result in enumerate(results):
        assert len(result["fp32"]) == 3 * 2 * 2 * 3
        for key, errors in result["fp32"].items():
            for name, value in errors.items():
                assert value < 1e-5, f"rank {rank} {key} {name}: relative error {value:.2e}"
        assert result["bf16"]["grad_dtype"] == "torch.bfloat16"
        assert result["bf16"]["log_prob"] < 1e-5
        assert result["bf16"]["grad"] < 1e-2  # bf16 rounding of the returned gradient


def test_bad_arguments_are_named():
    import pytest

    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    logits = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(4, dtype=torch.long), None, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(4, dtype=torch.long), None, chunk_size=0)
    with pytest.raises(ValueError, match="leading dims"):
        vocab_parallel_logprobs_entropy(logits, torch.zeros(5, dtype=torch.long), None)


def test_leading_dims_and_no_grad_needed():
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    logits = torch.randn(2, 3, 10)
    target = torch.randint(0, 10, (2, 3))
    log_prob, entropy = vocab_parallel_logprobs_entropy(logits, target)
    expected = torch.log_softmax(logits, -1).gather(-1, target[..., None]).squeeze(-1)
    torch.testing.assert_close(log_prob, expected, rtol=1e-5, atol=1e-6)
    assert entropy.shape == (2, 3) and not log_prob.requires_grad
