"""Checkpoints: Megatron dist-checkpoint of model + optimizer, plus everything a resume needs.

Layout under `<output_dir>/checkpoints/`:

    step_<N>/            a complete Megatron dist checkpoint (torch_dist) + trainer_state.json
    latest               text file holding the directory name ("step_<N>"), written last
    .tmp_step_<N>/       a checkpoint being written (ignored by readers, removed by the next save)

What is saved: model and optimizer state (sharded, distributed optimizer as `dp_reshardable`, so
a resume may use another DP size), the LR schedule, RNG states of python/numpy/torch per
(PP, TP) rank (replicated over DP, as Megatron does), and the driver's state (step, rollout
counters, data-sampler state, ...) as a plain dict in the common part of the checkpoint.

Crash safety: every rank writes into `.tmp_step_<N>`; only after all ranks are done does rank 0
rename it to `step_<N>` and then replace `latest` atomically (write + fsync + os.replace). A kill
at any moment therefore leaves `latest` naming a complete checkpoint. Readers also fall back to
the newest complete `step_*` directory when `latest` is missing or names something incomplete.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject

from maspo_megatron.checkpoint.dist_load import load_dist_checkpoint
from maspo_megatron.models.wrappers import unwrap
from maspo_megatron.utils.files import write_text_atomically

LATEST_FILE = "latest"
STATE_FILE = "trainer_state.json"  # written by rank 0 after the dist checkpoint: marks completeness
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Sharding of the distributed optimizer's state that can be loaded at another DP size.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file() and (path / "metadata.json").is_file()


def find_latest(root: str | Path) -> Optional[Path]:
    """The checkpoint to resume from: `latest` if it names a complete one, else the newest complete step_*."""
    root = Path(root)
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if candidate.name and is_complete(candidate):
            return candidate
    steps = sorted(
        (int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)) and is_complete(p)
    )
    return steps[-1][1] if steps else None


def read_trainer_state(path: str | Path) -> Dict[str, Any]:
    """The human-readable summary rank 0 writes next to the dist checkpoint (step, counters, layout)."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def _model_keys(model_chunks: Sequence[torch.nn.Module]) -> List[str]:
    # Megatron's convention: "model" for one chunk, "model0", "model1", ... with virtual pipelining.
    return ["model"] if len(model_chunks) == 1 else [f"model{i}" for i in range(len(model_chunks))]


def _layout() -> Dict[str, int]:
    return {
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "dp": parallel_state.get_data_parallel_world_size(with_context_parallel=True),
    }


def _rng_object(state: Optional[dict]) -> ShardedObject:
    """RNG states as one object per (PP, TP) position, replicated over DP (+CP) like Megatron's."""
    layout = _layout()
    return ShardedObject(
        "rng_state",
        state,
        (layout["pp"], layout["tp"]),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )


def capture_rng_state() -> dict:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    # Megatron's model-parallel RNG streams (on CPU the shim keeps them as CPU generator states).
    state["cuda_tracker"] = {name: s.clone() for name, s in get_cuda_rng_tracker().get_states().items()}
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    if state.get("cuda_tracker"):
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["cuda_tracker"])


def _sharded_state_dict(model_chunks, optimizer, *, is_loading: bool, with_rng: bool) -> dict:
    state: Dict[str, Any] = {}
    for key, chunk in zip(_model_keys(model_chunks), model_chunks, strict=True):
        state[key] = unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=OPTIMIZER_METADATA)
    if with_rng:
        state["rng_state"] = _rng_object(None if is_loading else capture_rng_state())
    return state


def _broadcast_from_rank0(obj: Any) -> Any:
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _is_rank0() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    driver_state: Dict[str, Any],
    *,
    keep_last: int = 2,
) -> Path:
    """Collective: every rank calls it. `driver_state` is taken from rank 0 (other ranks may pass {})."""
    root = checkpoint_root(output_dir)
    final = root / step_dir_name(step)
    tmp = root / f".tmp_{step_dir_name(step)}"
    if _is_rank0():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    driver_state = _broadcast_from_rank0(driver_state)
    state = _sharded_state_dict(model_chunks, optimizer, is_loading=False, with_rng=True)
    state["driver"] = driver_state
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["layout"] = _layout()
    dist_checkpointing.save(state, str(tmp), validate_access_integrity=True)
    _barrier()
    if _is_rank0():
        flat = {**driver_state, **driver_state.get("counters", {})}
        summary = {"step": step, "layout": _layout(), **{k: v for k, v in flat.items() if _is_json_scalar(v)}}
        write_text_atomically(tmp / STATE_FILE, json.dumps(summary, indent=1, sort_keys=True))
        if final.exists():  # re-saving the same step (e.g. after a resume): keep the old one until the swap
            stale = root / f".old_{final.name}"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        write_text_atomically(root / LATEST_FILE, final.name + "\n")
        prune_checkpoints(root, keep_last, keep=final)
    _barrier()
    return final


def save_model_weights(path: str | Path, model_chunks: Sequence[torch.nn.Module]) -> Path:
    """Collective: the model weights alone as a dist checkpoint at `path` (replaced atomically).

    Read back with `checkpoint.dist_load.load_model_weights` at any layout (same keys as a trainer checkpoint).
    """
    final = Path(path)
    tmp = final.with_name(f".tmp_{final.name}")
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    dist_checkpointing.save(_sharded_state_dict(model_chunks, None, is_loading=False, with_rng=False), str(tmp),
                            validate_access_integrity=True)
    _barrier()
    if _is_rank0():
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    _barrier()
    return final


def _is_json_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool)) or value is None


def prune_checkpoints(root: Path, keep_last: int, keep: Path) -> None:
    """Removes all but the newest `keep_last` complete checkpoints, and leftovers of interrupted saves."""
    steps = sorted((int(m.group(1)), p) for p in root.glob("step_*") if (m := _STEP_DIR.match(p.name)))
    complete = [p for _, p in steps if is_complete(p)]
    for path in complete[:-keep_last]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)
    for leftover in list(root.glob(".tmp_step_*")) + list(root.glob(".old_step_*")):
        shutil.rmtree(leftover, ignore_errors=True)


def _ensure_optimizer_state(optimizer) -> None:
    """Gives a fresh torch Adam its (zero) state so that Megatron can describe it for loading.

    Without apex/Transformer Engine, Megatron's optimizers read the Adam `step` from the torch
    optimizer's per-param state, which is empty until the first step (the distributed optimizer
    then fails `assert len(steps) == 1`). Zero moments and step 0 are what Adam starts from, and
    the checkpoint load overwrites them.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None or len(torch_opt.state) > 0:
            continue
        for group in torch_opt.param_groups:
            for param in group["params"]:
                torch_opt.state[param] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param.data),
                    "exp_avg_sq": torch.zeros_like(param.data),
                }


def _restore_adam_steps(optimizer) -> None:
    """Gives every param its own, correct Adam `step` tensor after a load.

    Megatron's distributed optimizer on the torch-Adam path (no apex/TE) keeps the step count in
    the param groups (`group["step"]`) and restores per-param `state["step"]` as ONE tensor object
    shared by all params, which then stays at the dummy value after the dp-reshardable parameter
    state is loaded (and torch Adam would increment a shared tensor once per param). Setting a
    fresh tensor per param from the group's count makes a resumed run's bias correction exact.
    """
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = getattr(inner, "optimizer", None)
        if torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state.get(param)
                if not state or not isinstance(state.get("step"), torch.Tensor):
                    continue
                count = group.get("step")
                state["step"] = torch.tensor(float(count)) if count is not None else state["step"].clone()


def load_checkpoint(
    path: str | Path,
    model_chunks: Sequence[torch.nn.Module],
    optimizer,
    scheduler,
    *,
    load_optimizer: bool = True,
) -> Dict[str, Any]:
    """Collective: loads model (+ optimizer, schedule, RNG) in place and returns the driver state.

    The parallel layout may differ from the one that saved (model and optimizer are resharded);
    RNG states are restored only when TP and PP sizes match (they are per (PP, TP) position).
    A checkpoint holding pickled callables is refused first (CheckpointError, `guard.py`).
    """
    path = Path(path)
    if not is_complete(path):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE} / metadata.json)")
    saved_layout = read_trainer_state(path)["layout"]  # json: data only
    with_rng = False

    def request() -> dict:  # built after the guard: a refused checkpoint leaves the optimizer as it was
        nonlocal with_rng
        now = _layout()
        with_rng = saved_layout["tp"] == now["tp"] and saved_layout["pp"] == now["pp"]
        if load_optimizer and optimizer is not None:
            _ensure_optimizer_state(optimizer)
        return _sharded_state_dict(model_chunks, optimizer if load_optimizer else None, is_loading=True, with_rng=with_rng)

    loaded = load_dist_checkpoint(path, request)
    for key, chunk in zip(_model_keys(model_chunks), model_chunks, strict=True):
        unwrap(chunk).load_state_dict(loaded[key], strict=True)
    if load_optimizer and optimizer is not None:
        with torch.no_grad():  # fp32 main params are leaves that require grad (CPU_NOTES.md)
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer)
    if scheduler is not None and loaded.get("scheduler") is not None:
        scheduler.load_state_dict(loaded["scheduler"])
    if with_rng:
        restore_rng_state(loaded["rng_state"])
    return loaded["driver"]
