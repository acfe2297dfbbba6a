"""Loading a Megatron dist checkpoint (torch_dist) into live model chunks, after the guard.

    load_model_weights(model_chunks, ckpt_dir)   # model.load, the KL reference's reload

The trainer's full resume (optimizer, schedule, RNG, driver state) is `trainer_state.load_checkpoint`.
"""
from __future__ import annotations

from pathlib import Path

from megatron.core import dist_checkpointing

from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.guard import verify_checkpoint_is_data
from maspo_megatron.models.wrappers import unwrap


def load_model_weights(model_chunks: list, ckpt_dir: str | Path) -> None:
    """Collective: loads model weights only (any saved TP/PP) from a converted or trainer checkpoint.

    Refuses (CheckpointError) a checkpoint holding pickled callables (`guard.py`). Works on
    the parallel layout the chunks were built with; vocab tensors saved with other padding
    load their overlap (Megatron marks them allow_shape_mismatch) and the rest stays zero.
    """
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").is_file():
        raise CheckpointError(f"{ckpt_dir}: not a Megatron dist checkpoint (no metadata.json)")
    verify_checkpoint_is_data(ckpt_dir)  # Megatron's load below unpickles without an allow-list
    chunks = [unwrap(c) for c in model_chunks]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]
    request = {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks, strict=True)}
    loaded = dist_checkpointing.load(request, str(ckpt_dir))
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
