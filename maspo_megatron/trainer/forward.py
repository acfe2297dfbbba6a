"""ONE forward step for every pass over a policy: old log-probs, PPO update, SFT warm-up, KL reference.

    losses = run_micro_batches(policy, batches, loss_fn, dims, forward_only=False)
    # loss_fn(batch, logits[R, S, V/TP]) -> (loss, num_tokens, {metric: SUM})  (Megatron's loss_func)

What differs between passes is only `loss_fn`. Everything the model needs from a batch is
decided here, once: the inputs of the attention backend the policy was built with (THD
`packed_seq_params` for "te"/"packed", the dense block mask for "dense" on CPU), bf16/fp16
logits without Float16Module's fp32 copy, and the UNSHARDED row length handed to Megatron's
schedule (it divides by cp itself). The logits a `loss_fn` gets still hold Megatron's padded
vocabulary columns: it passes `vocab_size=policy.meta.vocab_size` to
`vocab_parallel_logprobs_entropy`, whose kernels never read them (no masked [T, V/TP] copy of the
logits, forward or backward). Batches arrive already on the policy's device (packed and moved
once, trainer/train_step.pack_mini_batches), so in-place writes of one pass (old log-probs,
reference log-probs) land in the tensors the next pass reads.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List

from maspo_megatron.parallel.pipeline import check_pipeline_comm
from maspo_megatron.trainer.batch import PackedMicroBatch

THD_BACKENDS = ("te", "packed")


def model_inputs(batch: PackedMicroBatch, attention_backend: str, half_precision: bool = False) -> dict:
    """Model-call keyword arguments for one micro-batch under the policy's attention backend.

    half_precision: the chunks are Float16Module-wrapped (bf16/fp16); the last stage then hands the
    loss its logits in that dtype (`fp32_output=False`) instead of an fp32 copy of them (~10 GiB per
    [16k, 76k] micro-batch and its gradient): the fused log-prob computes in fp32 from either.
    """
    extra = {"fp32_output": False} if half_precision else {}
    if attention_backend in THD_BACKENDS:
        return {"input_ids": batch.tokens, "position_ids": batch.position_ids, "attention_mask": None,
                "packed_seq_params": batch.packed_seq_params(on_device=attention_backend == "te"), **extra}
    if attention_backend == "dense":
        return {"input_ids": batch.tokens, "position_ids": batch.position_ids,
                "attention_mask": batch.attention_mask(), **extra}
    raise ValueError(f"attention backend {attention_backend!r} is not one of {[*THD_BACKENDS, 'dense']}")


def make_forward_step(policy, loss_fn: Callable) -> Callable:
    """forward_step_func(data_iterator, model) for Megatron's get_forward_backward_func."""
    backend = policy.attention_backend
    half_precision = bool(policy.config.bf16 or policy.config.fp16)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(**model_inputs(batch, backend, half_precision)), partial(loss_fn, batch)

    return forward_step


def run_micro_batches(policy, batches: List[PackedMicroBatch], loss_fn: Callable, dims, *, forward_only: bool) -> list:
    """Megatron's pipeline schedule over `batches` (this rank's micro-batches); returns its losses list."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    check_pipeline_comm(policy.config)
    iterators = [iter(batches) for _ in policy.chunks] if len(policy.chunks) > 1 else iter(batches)
    return get_forward_backward_func()(
        forward_step_func=make_forward_step(policy, loss_fn), data_iterator=iterators,
        model=policy.chunks, num_microbatches=len(batches), seq_length=batches[0].tokens.shape[1] * dims.cp,
        micro_batch_size=batches[0].tokens.shape[0], forward_only=forward_only)
