"""Token sampling for the local engine: temperature, top-k, top-p, one seeded stream per sequence.

Each sequence owns a `torch.Generator` seeded from (seed, prompt index, sample index), and draws one
uniform number per step. The draw is an inverse-CDF lookup in the filtered, sorted distribution, so
a sequence's tokens do not depend on which other sequences share its batch (chunking, batch size).
"""
from __future__ import annotations

import hashlib

import torch


def sequence_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one (prompt, sample) stream, stable across runs and platforms."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}:{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int,
    top_p: float,
    generators: list[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one token per row.

    logits[B, V] (any float dtype) -> (tokens[B] int64, log_probs[B] fp32), where log_probs are
    `log_softmax(logits / temperature)` of the drawn tokens over the FULL vocabulary (top-k/top-p
    only restrict the support of the draw; see maspo_megatron/rollout/types.py).
    """
    scaled = logits.float() / temperature
    log_probs_full = torch.log_softmax(scaled, dim=-1)  # [B, V]
    probs_sorted, order = torch.sort(log_probs_full.exp(), dim=-1, descending=True, stable=True)  # [B, V]
    vocab = probs_sorted.shape[-1]
    if 0 < top_k < vocab:
        probs_sorted[:, top_k:] = 0.0
    if top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass BEFORE it does.
        mass_before = torch.cumsum(probs_sorted, dim=-1) - probs_sorted
        probs_sorted = torch.where(mass_before >= top_p, torch.zeros_like(probs_sorted), probs_sorted)
    cdf = torch.cumsum(probs_sorted, dim=-1)  # [B, V]; last column is the kept mass
    uniforms = torch.stack([torch.rand((), generator=g) for g in generators]).to(cdf.device, cdf.dtype)  # [B]
    targets = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    positions = torch.searchsorted(cdf, targets, right=True).clamp_(max=vocab - 1)  # [B, 1]
    # Rounding can land on a zero-probability tail slot; step back to the last kept token.
    kept = (probs_sorted > 0).sum(dim=-1, keepdim=True) - 1
    positions = torch.minimum(positions, kept)
    tokens = order.gather(-1, positions).squeeze(-1)  # [B]
    return tokens, log_probs_full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
