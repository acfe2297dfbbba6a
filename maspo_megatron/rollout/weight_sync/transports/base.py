"""What every transport implements, and the facts about the trainer's layout they share.

Call order in one sync (the `WeightSyncer` drives it; every rank calls every step):
    prepare(version)          collective: groups, URLs, directories
    send(bucket, version)     on each pipeline stage's export source, once per bucket
    peer_bucket()             (None unless a transport needs it) on the source's TP peers, at each bucket
    finish(version)           collective: the last bucket has been sent by every source
`engine` is the rollout engine handle and exists on global rank 0 only (the driver); transports call
its receiver methods (receiver.py) there and never build an engine's request bodies themselves.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch.distributed as dist

from maspo_megatron.rollout.weight_sync.bucketing import NamedTensor


class WeightSyncError(RuntimeError):
    """A weight sync failed or verification found a mismatch (the message names the tensors / server)."""


def stage_sources(dims) -> List[int]:
    """Global ranks of the export sources of all pipeline stages, in stage order (valid on sources)."""
    return dist.get_process_group_ranks(dims.pp_group) if dims.pp > 1 else [dist.get_rank()]


class Transport:
    name = "base"
    # A transport whose per-bucket exchange needs the source's TP peers too (tensor: each GPU makes its own
    # payload) sets a method here; the export stream calls it on the peers where the source sends a bucket.
    peer_bucket = None

    def __init__(self, cfg, dims, engine: Optional[Any] = None) -> None:
        self.cfg = cfg
        self.dims = dims
        self.engine = engine

    def receiver_error(self) -> Optional[str]:
        """Rank 0, when the syncer is built: why this transport cannot feed the engine, or None."""
        return None

    def prepare(self, version: int) -> None:
        """Collective, every rank."""

    def send(self, bucket: List[NamedTensor], version: int) -> None:
        """On export sources only."""
        raise NotImplementedError

    def finish(self, version: int) -> None:
        """Collective, every rank."""

    def close(self) -> None:
        """Releases groups / files; collective."""
