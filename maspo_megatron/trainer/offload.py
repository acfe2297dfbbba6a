"""The trainer's GPU memory handed to colocated SGLang servers while they generate (`rollout.colocated_offload`).

What is moved, as verl does for its colocated Megatron workers (`offload_megatron_model_to_cpu`,
`offload_megatron_optimizer`) and slime does wholesale with torch_memory_saver (`--offload-train`):

    optimizer   Adam's state (exp_avg, exp_avg_sq) and the fp32 main parameters of a bf16/fp16 model
                (Megatron's `shard_fp32_from_float16_groups` / `fp32_from_float16_groups`): copied to host
    grads       the DDP gradient buffers (`buffer.grad_data`): dropped, not copied (every optimizer step
                zeroes them first: train_step.ppo_update calls `zero_grad_buffer`)
    params      the DDP parameter buffers (`buffer.param_data`, which every model parameter views): copied
    reference   the frozen KL reference model's parameters and buffers (`reference_chunks`; algorithm.kl_coef
                > 0, unless algorithm.kl_reference_offload already keeps it in host memory): copied

Each tensor keeps its identity: its storage is resized to 0 bytes and back (every view, e.g. a
parameter of a DDP buffer or `param.main_grad`, sees the memory again), so Megatron's optimizer, DDP
and checkpointing hold the same objects throughout. On a GPU the host copies are pinned.

One step (trainer/loop.py), next to SGLang's own release/resume (docs/rollout.md, "Colocated mode"):

    rollout             trainer: optimizer, grads, params (and the KL reference) on the host
    before_train        SGLang releases all -> every rank: `reload()` (after the sample broadcast)
    train               (the KL reference's forward pass first: it came back with the rest)
    `offload(OPTIMIZER, GRADS, REFERENCE)`, empty cache, barrier -> after_train: SGLang maps its weights
    weight sync         (needs the parameters and the bucket buffers)
    `offload(PARAMS)`, barrier -> after_weight_sync: SGLang maps its KV cache -> next rollout

`resident()` brings everything back around a checkpoint save. Every transition is appended to
`events` (wall time, what, bytes on the host) for the driver's `memory_handover.jsonl`.
"""
from __future__ import annotations

import contextlib
import time
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple

import torch

OPTIMIZER, GRADS, PARAMS, REFERENCE = "optimizer", "grads", "params", "reference"
KINDS = (OPTIMIZER, GRADS, PARAMS, REFERENCE)


def _inner_optimizers(optimizer) -> List:
    """Megatron's ChainedOptimizer -> its parts; a single Megatron optimizer -> [itself]."""
    return list(getattr(optimizer, "chained_optimizers", None) or [optimizer])


def _flatten(groups) -> Iterator[torch.Tensor]:
    for item in groups or []:
        if isinstance(item, (list, tuple)):
            yield from _flatten(item)
        elif isinstance(item, torch.Tensor):
            yield item


def optimizer_tensors(optimizer) -> List[torch.Tensor]:
    """Adam's state tensors and the fp32 main copies of a low-precision model (never the model's own
    parameters: an fp32 model's optimizer steps them in place)."""
    out = []
    for part in _inner_optimizers(optimizer):
        inner = getattr(part, "optimizer", None)
        for state in (inner.state.values() if inner is not None else []):
            out.extend(v for v in state.values() if isinstance(v, torch.Tensor) and v.numel() > 1)
        for attr in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            out.extend(_flatten(getattr(part, attr, None)))
    return out


def ddp_buffers(chunks: Sequence[torch.nn.Module]) -> List:
    """Megatron DDP's parameter-and-gradient buffers of every chunk (dense and expert-parallel)."""
    out = []
    for chunk in chunks:
        out.extend(getattr(chunk, "buffers", None) or [])
        out.extend(getattr(chunk, "expert_parallel_buffers", None) or [])
    return out


class _Storage:
    """One storage taken off the device: its size, and its bytes on the host when they must come back."""

    def __init__(self, tensor: torch.Tensor, keep: bool) -> None:
        self.tensor = tensor
        self.storage = tensor.untyped_storage()
        self.nbytes = self.storage.nbytes()
        self.host = None
        if keep:
            self.host = torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=self.storage.device.type == "cuda")
            self.host.copy_(self._bytes())
        self.storage.resize_(0)

    def _bytes(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8, device=self.storage.device).set_(self.storage)

    def restore(self) -> None:
        self.storage.resize_(self.nbytes)
        if self.host is None:
            self._bytes().zero_()  # a dropped gradient buffer comes back zeroed, as zero_grad_buffer leaves it
        else:
            self._bytes().copy_(self.host)
        self.host = None


class TrainerOffload:
    """Moves the trainer's optimizer state, gradient buffers, parameters and the frozen reference model's
    weights (`reference_chunks`, none by default) off its device and back. `enabled=False` makes every
    call a no-op (the default: nothing is offloaded)."""

    def __init__(self, chunks: Sequence[torch.nn.Module], optimizer, enabled: bool, rank: int = 0,
                 reference_chunks: Sequence[torch.nn.Module] = ()) -> None:
        self.chunks = list(chunks)
        self.optimizer = optimizer
        self.reference_chunks = list(reference_chunks)
        self.enabled = bool(enabled)
        self.rank = rank
        self._away: Dict[str, List[_Storage]] = {}
        self.events: List[dict] = []

    def _tensors(self, kind: str) -> Iterable[Tuple[torch.Tensor, bool]]:
        """(tensor, keep its bytes) of one kind."""
        if kind == OPTIMIZER:
            return [(t, True) for t in optimizer_tensors(self.optimizer)]
        if kind == GRADS:
            return [(b.grad_data, False) for b in ddp_buffers(self.chunks)]
        if kind == REFERENCE:  # frozen, no DDP: its own parameter and buffer tensors
            return [(t, True) for chunk in self.reference_chunks for t in (*chunk.parameters(), *chunk.buffers())]
        return [(b.param_data, True) for b in ddp_buffers(self.chunks)]

    @property
    def offloaded(self) -> Tuple[str, ...]:
        return tuple(kind for kind in KINDS if kind in self._away)

    def _record(self, what: str) -> None:
        self.events.append({"time": time.time(), "rank": self.rank, "event": what, "offloaded": list(self.offloaded),
                            "host_bytes": sum(s.nbytes for stores in self._away.values() for s in stores if s.host is not None)})

    @torch.no_grad()
    def offload(self, *kinds: str) -> None:
        """Takes `kinds` (of KINDS) off the device; those already away are left as they are, REFERENCE is
        skipped without reference chunks."""
        if not self.enabled:
            return
        for kind in kinds:
            if kind not in KINDS:
                raise ValueError(f"TrainerOffload.offload: {kind!r} is not one of {KINDS}")
        kinds = tuple(kind for kind in kinds if kind != REFERENCE or self.reference_chunks)
        if not kinds:
            return
        seen = {s.storage._cdata for stores in self._away.values() for s in stores}  # storage identity
        for kind in kinds:
            if kind in self._away:
                continue
            stores = []
            for tensor, keep in self._tensors(kind):
                storage = tensor.untyped_storage()
                if storage.nbytes() == 0 or storage._cdata in seen:  # empty, or shared with one already away
                    continue
                seen.add(storage._cdata)
                stores.append(_Storage(tensor, keep))
            self._away[kind] = stores
        if any(s.storage.device.type == "cuda" for stores in self._away.values() for s in stores):
            torch.cuda.empty_cache()  # the freed blocks go back to the driver, for the colocated servers
        self._record("offload " + "+".join(kinds))

    @torch.no_grad()
    def reload(self) -> None:
        """Everything back on the device, as it was (dropped gradient buffers zeroed)."""
        if not self.enabled or not self._away:
            return
        for kind in KINDS:
            for store in self._away.pop(kind, []):
                store.restore()
        self._record("reload")

    @contextlib.contextmanager
    def resident(self):
        """Everything on the device inside (a checkpoint save); what was away goes away again after."""
        away = self.offloaded
        self.reload()
        try:
            yield
        finally:
            if away:
                self.offload(*away)
