"""Optional supervised warm-up before RL (`trainer.sft_warmup_steps`), for the synthetic task.

A randomly initialised tiny policy never produces `\\boxed{7}`, so every reward would be 0 and
GRPO advantages 0: RL has nothing to climb. A few hundred supervised steps on the task's
reference answers teach the FORMAT (and some arithmetic); RL then improves accuracy. The
warm-up uses the same Megatron model and optimizer (its own constant LR, `trainer.sft_lr`),
a token-mean negative log-likelihood over response tokens, and does not advance the RL LR
schedule. Its prompts come from a private RNG, so the RL data order is unaffected.
"""
from __future__ import annotations

import random
from functools import partial
from typing import Callable, List, Optional

import torch

from maspo_megatron.trainer.batch import PackedMicroBatch, TrainSample
from maspo_megatron.trainer.forward import run_micro_batches
from maspo_megatron.trainer.sample_handoff import broadcast_samples
from maspo_megatron.trainer.train_step import pack_mini_batches


def reference_samples(dataset, tokenizer, count: int, rng: random.Random) -> List[TrainSample]:
    """`count` (prompt, reference answer + eos) pairs drawn from the synthetic training set."""
    from maspo_megatron.data import reference_response

    samples = []
    for _ in range(count):
        item = dataset[rng.randrange(len(dataset))]
        if "reference" not in item.metadata:
            raise ValueError("trainer.sft_warmup_steps: the warm-up needs reference answers (the synthetic task); "
                             "set it to 0 for other datasets")
        text = reference_response(item, eos_token=tokenizer.eos_token)
        response = tokenizer(text, add_special_tokens=False)["input_ids"]
        samples.append(TrainSample(list(item.prompt_ids), response, 1.0, None))
    return samples


def _nll_loss(batch: PackedMicroBatch, logits: torch.Tensor, *, dims, vocab_size: int):
    """Sum of -log p over response tokens; Megatron divides by the global token count
    (calculate_per_token_loss), so the gradient is that of the token-mean NLL."""
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    log_prob, _ = vocab_parallel_logprobs_entropy(logits, batch.target, dims.tp_group, vocab_size=vocab_size)
    mask = batch.loss_mask
    nll = -(log_prob * mask).sum()
    tokens = batch.local_token_count
    return nll, tokens, {"nll_sum": nll.detach().double(), "tokens": tokens.double()}


def supervised_warmup(policy, optimizer, cfg, dims, *, dataset=None, tokenizer=None,
                      log: Optional[Callable[[str], None]] = None) -> Optional[float]:
    """Collective. Runs `trainer.sft_warmup_steps` steps; returns the last mean NLL on rank 0."""
    from maspo_megatron.parallel.metrics import reduce_sums
    from maspo_megatron.trainer.optim import all_grads_finite

    steps = cfg.trainer.sft_warmup_steps
    rng = random.Random(cfg.trainer.seed + 7919)
    saved_lrs = [group["lr"] for group in optimizer.param_groups]
    last = None
    for step in range(1, steps + 1):
        samples = None
        if dims.rank == 0:
            samples = reference_samples(dataset, tokenizer, cfg.trainer.sft_batch_size, rng)
        samples = broadcast_samples(samples, dims)
        batches = [mb for mini in pack_mini_batches(samples, cfg, dims, policy.attention_backend, mini_batches=1)
                   for mb in mini]
        for group in optimizer.param_groups:
            group["lr"] = cfg.trainer.sft_lr
        optimizer.zero_grad()
        for chunk in policy.chunks:
            chunk.zero_grad_buffer()
        sums = reduce_sums(run_micro_batches(policy, batches, partial(_nll_loss, dims=dims, vocab_size=policy.meta.vocab_size),
                                             dims, forward_only=False),
                           dims)
        if all_grads_finite(policy.chunks):
            optimizer.step()
        if sums is not None:
            last = sums["nll_sum"] / max(sums["tokens"], 1.0)
            if log is not None and (step == steps or step % max(1, steps // 10) == 0):
                log(f"sft warm-up {step}/{steps}: nll {last:.4f}")
    for group, lr in zip(optimizer.param_groups, saved_lrs, strict=True):
        group["lr"] = lr
    return last

