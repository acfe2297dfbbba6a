"""fused_output_logprobs_entropy (no [T, V] logits) vs an fp64 reference of hidden @ W.T -> log_softmax.

Both implementations of the per-block steps: torch (always) and Triton in its interpreter (where
triton imports; TRITON_INTERPRET=1 is set only in the fresh rank processes, see
test_logprob_triton.py). TP 1 and TP 2 over gloo; vocab blocks narrower than the shard, with a
ragged last block, so block merging, TP combining and off-block targets are all exercised.
"""
import importlib.util
import os

import pytest
import torch

from tests.helpers.multiproc import run_distributed
from tests.parallel._logprob_reference import rel_err

T, H, V = 20, 16, 600  # V/TP = 600 or 300; blocks of 128 columns: 5 or 3 blocks, the last one ragged
BLOCK = 128


def _inputs():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(T, H, generator=gen, dtype=torch.float64)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64) * 0.8
    hidden[2] *= 6.0  # a peaked row
    target = torch.randint(0, V, (T,), generator=gen)
    return hidden, weight, target, torch.randn(T, generator=gen, dtype=torch.float64), torch.randn(
        T, generator=gen, dtype=torch.float64)


def _reference(hidden, weight, target, temperature, w_lp, w_ent):
    """fp64 log_prob, entropy, d loss / d hidden [T, H], d loss / d weight [V, H]."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    log_probs = torch.log_softmax(hidden @ weight.t() / temperature, dim=-1)
    log_prob = log_probs.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    ((log_prob * w_lp).sum() + (entropy * w_ent).sum()).backward()
    return log_prob.detach(), entropy.detach(), hidden.grad, weight.grad




def _fused_case(kernel):
    import torch.distributed as dist

    from maspo_megatron.parallel.fused_output import fused_output_logprobs_entropy

    tp, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    group = None
    if tp > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    hidden64, weight64, target, w_lp, w_ent = _inputs()
    errors = {}
    for temperature in (1.0, 0.7):
        ref_lp, ref_ent, ref_dh, ref_dw = _reference(hidden64, weight64, target, temperature, w_lp, w_ent)
        hidden = hidden64.float().requires_grad_()
        weight = weight64.chunk(tp, dim=0)[rank].float().requires_grad_()
        before = (hidden.detach().clone(), weight.detach().clone())
        log_prob, entropy = fused_output_logprobs_entropy(hidden, weight, target, group, temperature=temperature,
                                                          vocab_chunk_size=BLOCK, kernel=kernel)
        ((log_prob * w_lp.float()).sum() + (entropy * w_ent.float()).sum()).backward()
        assert torch.equal(hidden.detach(), before[0]) and torch.equal(weight.detach(), before[1])
        grad_hidden = hidden.grad.clone()
        if tp > 1:  # each rank's grad_hidden is its vocab shard's part (ColumnParallelLinear semantics)
            dist.all_reduce(grad_hidden, group=group)
        errors[temperature] = {"log_prob": rel_err(log_prob.detach(), ref_lp),
                               "entropy": rel_err(entropy.detach(), ref_ent),
                               "grad_hidden": rel_err(grad_hidden, ref_dh),
                               "grad_weight": rel_err(weight.grad, ref_dw.chunk(tp, dim=0)[rank])}
    # only log_prob used: the entropy-free gradient path
    hidden = hidden64.float().requires_grad_()
    weight = weight64.chunk(tp, dim=0)[rank].float().requires_grad_()
    log_prob, _ = fused_output_logprobs_entropy(hidden, weight, target, group, vocab_chunk_size=BLOCK, kernel=kernel)
    (log_prob * w_lp.float()).sum().backward()
    _, _, _, ref_dw = _reference(hidden64, weight64, target, 1.0, w_lp, torch.zeros_like(w_ent))
    errors["log_prob_only"] = {"grad_weight": rel_err(weight.grad, ref_dw.chunk(tp, dim=0)[rank])}
    # Megatron's vocab padding: ids >= 250 are not part of the softmax (TP2: rank 1 holds padding only)
    vocab_size = 250
    padded_target = target % vocab_size
    ref_lp, ref_ent, ref_dh, ref_dw = _reference(hidden64, weight64[:vocab_size], padded_target, 1.0, w_lp, w_ent)
    ref_dw = torch.cat([ref_dw, torch.zeros(V - vocab_size, H, dtype=torch.float64)]).chunk(tp, dim=0)[rank]
    hidden = hidden64.float().requires_grad_()
    weight = weight64.chunk(tp, dim=0)[rank].float().requires_grad_()
    log_prob, entropy = fused_output_logprobs_entropy(hidden, weight, padded_target, group, vocab_chunk_size=BLOCK,
                                                      kernel=kernel, vocab_size=vocab_size)
    ((log_prob * w_lp.float()).sum() + (entropy * w_ent.float()).sum()).backward()
    grad_hidden = hidden.grad.clone()
    if tp > 1:
        dist.all_reduce(grad_hidden, group=group)
    errors["padded"] = {"log_prob": rel_err(log_prob.detach(), ref_lp), "entropy": rel_err(entropy.detach(), ref_ent),
                        "grad_hidden": rel_err(grad_hidden, ref_dh),
                        "grad_weight": rel_err(weight.grad, ref_dw) if ref_dw.abs().sum() > 0 else 0.0,
                        "padding_grad_weight_abs": float(weight.grad[ref_dw.abs().sum(1) == 0].abs().sum())}
    if tp > 1:
        dist.barrier()
    return errors


def _check(results):
    for rank, errors in enumerate(results):
        assert len(errors) == 4
        for key, quantities in errors.items():
            for name, value in quantities.items():
                assert value < 1e-5, f"rank {rank} {key} {name}: relative error {value:.2e}"


@pytest.mark.parametrize("tp", [1, 2])
def test_torch_blocks_match_fp64(tp):
    _check(run_distributed(_fused_case, tp, "torch", timeout_s=180))


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_interpreted_triton_blocks_match_fp64(tp):
    _check(run_distributed(_fused_case, tp, "triton", timeout_s=300, env={"TRITON_INTERPRET": "1"}))


def test_bad_arguments_are_named():
    from maspo_megatron.parallel.fused_output import fused_output_logprobs_entropy

    hidden, weight, target = torch.zeros(4, 8), torch.zeros(10, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        fused_output_logprobs_entropy(hidden, weight, target, vocab_chunk_size=0)
    with pytest.raises(ValueError, match=r"\[V/TP, H\]"):
        fused_output_logprobs_entropy(hidden, torch.zeros(10, 7), target)
    with pytest.raises(ValueError, match="differ"):
        fused_output_logprobs_entropy(hidden, weight.double(), target)
    with pytest.raises(ValueError, match="temperature"):
        fused_output_logprobs_entropy(hidden, weight, target, temperature=-1.0)


@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")
def test_compiled_triton_blocks_match_fp64_on_cuda():
    from maspo_megatron.parallel.fused_output import fused_output_logprobs_entropy

    gen = torch.Generator().manual_seed(1)
    rows, hidden_size, vocab = 256, 64, 5003
    hidden64 = torch.randn(rows, hidden_size, generator=gen, dtype=torch.float64)
    weight64 = torch.randn(vocab, hidden_size, generator=gen, dtype=torch.float64) * 0.5
    target = torch.randint(0, vocab, (rows,), generator=gen)
    w_lp, w_ent = torch.randn(rows, generator=gen, dtype=torch.float64), torch.randn(rows, generator=gen,
                                                                                     dtype=torch.float64)
    for dtype, grad_tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        # the reference starts from the same rounded inputs (fp32 matmuls: TF32 is off by default)
        hidden_in, weight_in = hidden64.to(dtype), weight64.to(dtype)
        ref_lp, ref_ent, ref_dh, ref_dw = _reference(hidden_in.double(), weight_in.double(), target, 0.7, w_lp, w_ent)
        hidden = hidden_in.cuda().requires_grad_()
        weight = weight_in.cuda().requires_grad_()
        log_prob, entropy = fused_output_logprobs_entropy(hidden, weight, target.cuda(), None, temperature=0.7,
                                                          vocab_chunk_size=1024, kernel="triton")
        ((log_prob * w_lp.cuda().float()).sum() + (entropy * w_ent.cuda().float()).sum()).backward()
        value_tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the logits blocks are rounded to bf16
        assert rel_err(log_prob.detach().cpu(), ref_lp) < value_tol, dtype
        assert rel_err(entropy.detach().cpu(), ref_ent) < value_tol, dtype
        assert rel_err(hidden.grad.cpu(), ref_dh) < grad_tol, dtype
        assert rel_err(weight.grad.cpu(), ref_dw) < grad_tol, dtype
        assert hidden.grad.dtype == dtype and weight.grad.dtype == dtype
