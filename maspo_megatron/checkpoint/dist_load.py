"""Loading a Megatron dist checkpoint (torch_dist) into live state, always through the guard.

    loaded = load_dist_checkpoint(ckpt_dir, build_request)   # the only call of Megatron's dist_checkpointing.load
    load_model_weights(model_chunks, ckpt_dir)         # model.load, the KL reference's reload

The trainer's resume (`trainer_state.load_checkpoint`) uses `load_dist_checkpoint` too; the
converter's slice reader (`dist_read.DistCheckpointReader`) runs the same guard first.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from megatron.core import dist_checkpointing

from maspo_megatron.checkpoint.guard import verify_checkpoint_is_data
from maspo_megatron.models.wrappers import unwrap


def load_dist_checkpoint(ckpt_dir: str | Path, build_request: Callable[[], dict]) -> dict:
    """Collective: Megatron's `dist_checkpointing.load(build_request(), ckpt_dir)` after the guard.

    Megatron's load unpickles `.metadata` and every ShardedObject without an allow-list, and TE
    unpickles `_extra_state` when the result reaches `load_state_dict`: the guard refuses
    (CheckpointError, one line naming file and key) a checkpoint holding anything but data
    first. The request is built only then, so a refused checkpoint changes nothing (building it
    may give a fresh optimizer its zero state).
    """
    verify_checkpoint_is_data(ckpt_dir)
    return dist_checkpointing.load(build_request(), str(ckpt_dir))


def load_model_weights(model_chunks: list, ckpt_dir: str | Path) -> None:
    """Collective: loads model weights only (any saved TP/PP) from a converted or trainer checkpoint.

    Refuses (CheckpointError) a checkpoint holding pickled callables (`guard.py`). Works on
    the parallel layout the chunks were built with; vocab tensors saved with other padding
    load their overlap (Megatron marks them allow_shape_mismatch) and the rest stays zero.
    """
    chunks = [unwrap(c) for c in model_chunks]
    keys = ["model"] if len(chunks) == 1 else [f"model{i}" for i in range(len(chunks))]

    def request() -> dict:
        return {key: chunk.sharded_state_dict() for key, chunk in zip(keys, chunks, strict=True)}

    loaded = load_dist_checkpoint(ckpt_dir, request)
    for key, chunk in zip(keys, chunks, strict=True):
        chunk.load_state_dict(loaded[key], strict=True)
