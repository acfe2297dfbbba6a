"""Settings of the interleaved (virtual) pipeline schedule that gradients depend on.

Megatron-Core's default point-to-point mode (`batch_p2p_comm=True`) posts every send and receive
of a step as ONE `batch_isend_irecv` list, in the order send_prev, recv_prev, send_next, recv_next.
With pp = 2 the previous and the next stage are the same rank, messages between two ranks are
matched in posting order (same tag), and the interleaved schedule's steady state sends a
gradient and an activation to that rank in one call: the receiver's gradient buffer gets the
activation. The forward (loss, statistics) still came out right on a tiny GPT (those activations
are discarded), but the gradients of every chunk but the last were wrong (20% to 400x, gloo,
Megatron-Core 0.16.1; traced in docs/parallel.md).
The unbatched path (`_p2p_ops`) orders sends/receives by even/odd rank and uses a second group
for pp = 2 exactly to keep the two directions apart; Megatron-LM's own training script selects it
for the interleaved schedule (`overlap_p2p_comm=True`, `batch_p2p_comm=False`). So do we, on
every model config that runs the interleaved schedule (trainer and tests alike).
"""
from __future__ import annotations

from typing import Optional


def pipeline_comm_settings(pp: int, vpp: Optional[int]) -> dict:
    """TransformerConfig fields for the pipeline's p2p mode (empty: keep Megatron's defaults)."""
    if pp > 1 and vpp:
        return {"overlap_p2p_comm": True, "batch_p2p_comm": False}
    return {}


def apply_pipeline_comm_settings(config, pp: int, vpp: Optional[int]) -> None:
    """Sets `pipeline_comm_settings` on an existing TransformerConfig (before the schedule runs)."""
    for key, value in pipeline_comm_settings(pp, vpp).items():
        setattr(config, key, value)


def check_pipeline_comm(config) -> None:
    """Refuses the batched p2p mode with the interleaved schedule (wrong gradients at pp = 2)."""
    if (config.virtual_pipeline_model_parallel_size and config.pipeline_model_parallel_size > 1
            and config.batch_p2p_comm):
        raise ValueError("parallel.vpp: the interleaved pipeline schedule needs batch_p2p_comm=False "
                         "(apply maspo_megatron.parallel.pipeline.apply_pipeline_comm_settings to the model config)")


def interleaved_micro_batches(count: int, pp: int, vpp: Optional[int]) -> int:
    """Micro-batch count the interleaved schedule accepts: at least pp and a multiple of pp.

    (Megatron-Core 0.16.1 raises otherwise; microbatch_group_size_per_vp_stage defaults to pp.)
    Without vpp the count is returned unchanged.
    """
    if pp > 1 and vpp:
        return max(pp, -(-count // pp) * pp)
    return count
