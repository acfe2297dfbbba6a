"""The frozen reference policy of the KL penalty (`algorithm.kl_coef > 0`).

    reference = build_reference(cfg, dims, tokenizer, policy, output_dir, resumed)   # collective
    fill_reference_log_probs(reference, mini_batches, cfg, dims)   # after the old-log-prob pass

The reference is the policy as RL starts (after loading and any supervised warm-up): a second
Megatron model of the SAME layout, built frozen (no DDP, no gradient buffer), its weights copied
from the policy shard by shard (no communication), never updated. With
`algorithm.kl_reference_offload` its weights wait in host memory between reference passes (one
host-to-device copy of them per RL step). Its weights are written once to `<output_dir>/reference` so that
a resumed run compares against the same reference (the policy's checkpoint holds trained weights).
Its log-probs go into `batch.ref_log_probs` through the one forward step (trainer/forward.py), at
the rollout temperature, as the old log-probs do; the KL term in trainer/loss.py reads them.
"""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import List

import torch

from maspo_megatron.trainer.batch import PackedMicroBatch
from maspo_megatron.trainer.forward import run_micro_batches

REFERENCE_SUBDIR = "reference"


def build_reference(cfg, dims, tokenizer, policy, output_dir: str | Path, resumed: bool):
    """Collective. The reference Policy: a copy of `policy` on a fresh start, the saved one on resume."""
    from maspo_megatron.checkpoint.dist_load import load_model_weights
    from maspo_megatron.checkpoint.trainer_state import capture_rng_state, restore_rng_state, save_model_weights
    from maspo_megatron.models.wrappers import unwrap
    from maspo_megatron.trainer.setup import build_policy

    path = Path(output_dir) / REFERENCE_SUBDIR
    if resumed and not (path / "metadata.json").is_file():
        raise ValueError(f"algorithm.kl_coef: resuming needs the reference weights in {path}, which a run started "
                         "without a KL term did not write; start a fresh run (or set kl_coef to 0)")
    rng = capture_rng_state()  # build_policy re-seeds: the run's random streams must not notice it
    reference = build_policy(cfg, dims, tokenizer, frozen=True)
    restore_rng_state(rng)
    if resumed:
        load_model_weights(reference.chunks, path)
    else:
        with torch.no_grad():
            for ours, theirs in zip(reference.chunks, policy.chunks, strict=True):
                pairs = zip(unwrap(ours).named_parameters(), unwrap(theirs).named_parameters(), strict=True)
                for (name, target), (other, source) in pairs:
                    if name != other:
                        raise RuntimeError(f"reference policy: parameter {name} does not match the policy's {other}")
                    target.copy_(source)
        save_model_weights(path, reference.chunks)
    _place(reference, "cpu" if cfg.algorithm.kl_reference_offload else dims.device)
    return reference


def _place(reference, device) -> None:
    for chunk in reference.chunks:
        chunk.to(device, non_blocking=True)


def _reference_logprob_loss(batch: PackedMicroBatch, logits: torch.Tensor, *, temperature: float, tp_group,
                            vocab_size: int):
    """Forward-only 'loss': writes the reference's log-probs into batch.ref_log_probs (response tokens)."""
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    with torch.no_grad():
        log_prob, _ = vocab_parallel_logprobs_entropy(logits, batch.target, tp_group, temperature=temperature,
                                                      vocab_size=vocab_size)
    mask = batch.loss_mask
    batch.ref_log_probs[mask] = log_prob[mask]
    return torch.zeros((), device=logits.device), batch.local_token_count, {}


def fill_reference_log_probs(reference, mini_batches: List[List[PackedMicroBatch]], cfg, dims) -> None:
    """Collective. batch.ref_log_probs of every micro-batch (on the last pipeline stage) from the reference."""
    loss_fn = partial(_reference_logprob_loss, temperature=cfg.rollout.temperature, tp_group=dims.tp_group,
                      vocab_size=reference.meta.vocab_size)
    offload = cfg.algorithm.kl_reference_offload and dims.device.type != "cpu"
    if offload:
        _place(reference, dims.device)
    with torch.no_grad():
        for batches in mini_batches:
            run_micro_batches(reference, batches, loss_fn, dims, forward_only=True)
    if offload:
        _place(reference, "cpu")
