"""The Triton kernels of vocab_parallel_logprobs_entropy vs an fp64 full-vocabulary reference.

On CPU the kernels run in Triton's interpreter: every case runs in fresh processes (run_distributed)
with TRITON_INTERPRET=1, because the interpreter is chosen when the kernels are defined and must
not leak into (or from) the CUDA tests of the same pytest process. TP 2 runs over gloo.
Skipped where triton does not import. The `gpu` tests run the compiled kernels on CUDA.
"""
import importlib.util
import os

import pytest
import torch

from tests.helpers.multiproc import run_distributed
from tests.parallel._logprob_reference import reference, rel_err

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not importable")

T, V = 24, 1000  # V/TP = 1000 or 500: neither a multiple of the interpreter's 256-wide vocab block
INTERPRET = {"TRITON_INTERPRET": "1"}




def _inputs(seed=11):
    generator = torch.Generator().manual_seed(seed)
    full = torch.randn(T, V, generator=generator, dtype=torch.float64) * 4.0
    full[3] += 30.0  # a peaked row
    full[5, :300] -= 80.0  # a row whose first blocks are far below its max (running max grows late)
    target = torch.randint(0, V, (T,), generator=generator)
    w_lp = torch.randn(T, generator=generator, dtype=torch.float64)
    w_ent = torch.randn(T, generator=generator, dtype=torch.float64)
    return full, target, w_lp, w_ent


def _run(shard, target, group, temperature, w_lp, w_ent, kernel="triton"):
    """log_prob, entropy, grad of the weighted loss; checks that the input is left unchanged."""
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    logits = shard.clone().requires_grad_()
    before = logits.detach().clone()
    log_prob, entropy = vocab_parallel_logprobs_entropy(logits, target, group, temperature=temperature,
                                                        kernel=kernel)
    assert log_prob.dtype == torch.float32 and entropy.dtype == torch.float32
    loss = 0.0
    if w_lp is not None:
        loss = loss + (log_prob * w_lp.float()).sum()
    if w_ent is not None:
        loss = loss + (entropy * w_ent.float()).sum()
    loss.backward()
    assert torch.equal(logits.detach(), before), "input modified"
    return log_prob.detach(), entropy.detach(), logits.grad


def _interpreted_case():
    """Every check at this process group's TP size (1 or 2); returns {case: {quantity: error}}."""
    import torch.distributed as dist

    from maspo_megatron.parallel.vocab_parallel import use_triton_kernel

    tp = int(os.environ["WORLD_SIZE"])
    group = None
    if tp > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    rank = int(os.environ["RANK"])
    full, target, w_lp, w_ent = _inputs()
    in_shard = (target // (V // tp) == rank).sum().item()
    assert use_triton_kernel(full.float(), "auto"), "auto must pick Triton under TRITON_INTERPRET=1"
    errors = {"in_shard_targets": in_shard}
    for temperature in (1.0, 0.6):
        for use_lp, use_ent in ((True, True), (True, False), (False, True)):
            lp_w, ent_w = (w_lp if use_lp else None), (w_ent if use_ent else None)
            ref_lp, ref_ent, ref_grad = reference(full, target, temperature, lp_w, ent_w)
            ref_grad = ref_grad.chunk(tp, dim=1)[rank]
            log_prob, entropy, grad = _run(full.chunk(tp, dim=1)[rank].float(), target, group, temperature, lp_w, ent_w)
            errors[("fp32", temperature, use_lp, use_ent)] = {
                "log_prob": rel_err(log_prob, ref_lp), "entropy": rel_err(entropy, ref_ent),
                "grad": rel_err(grad, ref_grad),
                "grad_max_abs": float((grad.double() - ref_grad).abs().max() / ref_grad.abs().max())}
    # A row stride wider than the shard (a column slice of a wider tensor): the kernels index by stride.
    wide = torch.cat([full.chunk(tp, dim=1)[rank].float(), torch.full((T, 7), 1e4)], dim=1)
    ref_lp, ref_ent, ref_grad = reference(full, target, 0.6, w_lp, w_ent)
    log_prob, entropy, grad = _run(wide[:, :V // tp], target, group, 0.6, w_lp, w_ent)
    errors["row_stride"] = {"log_prob": rel_err(log_prob, ref_lp), "entropy": rel_err(entropy, ref_ent),
                            "grad": rel_err(grad, ref_grad.chunk(tp, dim=1)[rank])}
    # bf16 / fp16 logits: fp32 arithmetic from the rounded inputs, the gradient in the input dtype.
    for dtype in (torch.bfloat16, torch.float16):
        rounded = full.to(dtype).double()
        ref_lp, ref_ent, ref_grad = reference(rounded, target, 0.6, w_lp, w_ent)
        shard = rounded.chunk(tp, dim=1)[rank].to(dtype)
        log_prob, entropy, grad = _run(shard, target, group, 0.6, w_lp, w_ent)
        torch_grad = _run(shard, target, group, 0.6, w_lp, w_ent, kernel="torch")[2]
        errors[str(dtype)] = {"log_prob": rel_err(log_prob, ref_lp), "entropy": rel_err(entropy, ref_ent),
                              "grad": rel_err(grad, ref_grad.chunk(tp, dim=1)[rank]),
                              "grad_vs_torch_kernel": rel_err(grad, torch_grad.double()),
                              "grad_dtype": str(grad.dtype)}
    if tp > 1:
        dist.barrier()
    return errors


def _check(results, tp):
    for rank, errors in enumerate(results):
        in_shard = errors.pop("in_shard_targets")  # TP2: targets inside and outside this rank's shard
        assert in_shard == T if tp == 1 else 0 < in_shard < T, (rank, in_shard)
        for dtype in ("torch.bfloat16", "torch.float16"):
            low = errors.pop(dtype)
            assert low.pop("grad_dtype") == dtype
            assert low["log_prob"] < 1e-5 and low["entropy"] < 1e-5, (rank, dtype, low)
            assert low["grad"] < 1e-2, (rank, dtype, low)  # rounding of the returned gradient
            assert low["grad_vs_torch_kernel"] < 1e-2, (rank, dtype, low)
        assert len(errors) == 2 * 3 + 1
        for key, quantities in errors.items():
            for name, value in quantities.items():
                assert value < 1e-5, f"TP{tp} rank {rank} {key} {name}: relative error {value:.2e}"


@needs_triton
def test_interpreted_kernels_match_fp64_at_tp1():
    _check(run_distributed(_interpreted_case, 1, timeout_s=300, env=INTERPRET), 1)


@needs_triton
def test_interpreted_kernels_match_fp64_at_tp2():
    _check(run_distributed(_interpreted_case, 2, timeout_s=300, env=INTERPRET), 2)


def _padding_case(kernel):
    """Megatron's vocab padding via vocab_size: every TP layout, including a shard of padding only."""
    import torch.distributed as dist

    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    tp, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    group = None
    if tp > 1:
        dist.init_process_group("gloo")
        group = dist.group.WORLD
    full, _, w_lp, w_ent = _inputs()
    errors = {}
    for vocab_size in (430, 760):  # TP2: rank 1 holds padding only / a partly padded shard
        target = torch.randint(0, vocab_size, (T,), generator=torch.Generator().manual_seed(vocab_size))
        ref_lp, ref_ent, ref_grad = reference(full[:, :vocab_size], target, 0.6, w_lp, w_ent)
        ref_grad = torch.cat([ref_grad, torch.zeros(T, V - vocab_size, dtype=torch.float64)], dim=1)
        logits = full.chunk(tp, dim=1)[rank].float().requires_grad_()
        log_prob, entropy = vocab_parallel_logprobs_entropy(logits, target, group, temperature=0.6, kernel=kernel,
                                                            vocab_size=vocab_size)
        ((log_prob * w_lp.float()).sum() + (entropy * w_ent.float()).sum()).backward()
        local_ref = ref_grad.chunk(tp, dim=1)[rank]
        padding = local_ref.abs().sum(0) == 0
        errors[vocab_size] = {"log_prob": rel_err(log_prob.detach(), ref_lp),
                              "entropy": rel_err(entropy.detach(), ref_ent),
                              "grad": rel_err(logits.grad, local_ref) if not padding.all() else 0.0,
                              "padding_grad_abs": float(logits.grad[:, padding].abs().sum()),
                              "padding_columns": int(padding.sum())}
    if tp > 1:
        dist.barrier()
    return errors


def _check_padding(results, tp):
    for rank, errors in enumerate(results):
        for vocab_size, quantities in errors.items():
            expected_padding = max(0, min(V // tp, (rank + 1) * V // tp - vocab_size))
            assert quantities.pop("padding_columns") == expected_padding, (rank, vocab_size)
            assert quantities.pop("padding_grad_abs") == 0.0, (rank, vocab_size)
            for name, value in quantities.items():
                assert value < 1e-5, f"TP{tp} rank {rank} vocab_size {vocab_size} {name}: {value:.2e}"


@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_padding_torch_kernel(tp):
    _check_padding(run_distributed(_padding_case, tp, "torch", timeout_s=180), tp)


@needs_triton
@pytest.mark.parametrize("tp", [1, 2])
def test_vocab_padding_interpreted_triton_kernel(tp):
    _check_padding(run_distributed(_padding_case, tp, "triton", timeout_s=300, env=INTERPRET), tp)


def test_kernel_argument_is_checked():
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    logits, target = torch.zeros(4, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="kernel"):
        vocab_parallel_logprobs_entropy(logits, target, None, kernel="cuda")
    with pytest.raises(ValueError, match="vocab_size"):
        vocab_parallel_logprobs_entropy(logits, target, None, vocab_size=0)
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        with pytest.raises(ValueError, match="kernel: 'triton' needs"):
            vocab_parallel_logprobs_entropy(logits, target, None, kernel="triton")


def _cuda_errors(rows, vocab, dtype, temperature, checked_rows):
    """Compiled kernel on CUDA vs fp64 on `checked_rows` (loss weights are zero on the other rows)."""

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, generator=gen, device="cuda", dtype=torch.float32) * 3).to(dtype)
    target = torch.randint(0, vocab, (rows,), generator=gen, device="cuda")
    w_lp = torch.zeros(rows, device="cuda", dtype=torch.float64)
    w_ent = torch.zeros(rows, device="cuda", dtype=torch.float64)
    w_lp[checked_rows], w_ent[checked_rows] = 1.0, -0.5
    log_prob, entropy, grad = _run(logits, target, None, temperature, w_lp, w_ent)
    sub = logits[checked_rows].double()
    ref_lp, ref_ent, ref_grad = reference(sub, target[checked_rows], temperature, w_lp[checked_rows],
                                           w_ent[checked_rows])
    return {"log_prob": rel_err(log_prob[checked_rows], ref_lp), "entropy": rel_err(entropy[checked_rows], ref_ent),
            "grad": rel_err(grad[checked_rows], ref_grad), "grad_dtype": grad.dtype}


@pytest.mark.gpu
@needs_triton
def test_compiled_kernels_match_fp64_on_cuda():
    rows = torch.arange(0, 300, 7, device="cuda")
    for dtype, grad_tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        for vocab in (5003, 75968):  # a ragged tail; a TP2 shard of Qwen's 151,936
            errors = _cuda_errors(300, vocab, dtype, 0.7, rows)
            assert errors.pop("grad_dtype") == dtype
            assert errors.pop("grad") < grad_tol, (dtype, vocab, errors)
            for name, value in errors.items():
                assert value < 1e-5, (dtype, vocab, name, value)


@pytest.mark.gpu
@needs_triton
def test_compiled_kernels_use_int64_offsets_on_cuda():
    """T * V/TP > 2^31 elements: the last rows sit past int32 offsets."""
    rows, vocab = 14200, 151936
    assert rows * vocab > 2**31
    errors = _cuda_errors(rows, vocab, torch.bfloat16, 1.0, torch.arange(rows - 5, rows, device="cuda"))
    assert errors["log_prob"] < 1e-5 and errors["entropy"] < 1e-5 and errors["grad"] < 1e-2, errors
