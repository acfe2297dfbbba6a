"""`WeightSyncer`: one call per training step pushes the policy's weights into the rollout engines.

    syncer = WeightSyncer(cfg.rollout.weight_sync, chunks, wmap, dims, engine=engine_on_rank0,
                          engine_kind=cfg.rollout.engine)
    report = syncer.sync(weight_version=step)      # every rank calls it; the report is for rank 0

One sync, read top to bottom:
    rank 0: pause generation, flush the cache, open the weight-update session (if the servers have it)
    every stage: HF-tensor stream (TP gather, own layers) -> [FP8] -> buckets -> transport.send
    every rank: transport.finish (the last buckets land)
    rank 0: close the session, set the weight version, [verify checksums], continue generation
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, Optional, Sequence

import torch.distributed as dist

from maspo_megatron.rollout.registry import engine_names, engine_traits
from maspo_megatron.rollout.weight_sync import verify
from maspo_megatron.rollout.weight_sync.bucket_writer import BucketBuffers, iter_export_buckets
from maspo_megatron.rollout.weight_sync.bucketing import bucket_nbytes, iter_buckets
from maspo_megatron.rollout.weight_sync.fp8 import DEFAULT_BLOCK, fp8_stream
from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source, megatron_hf_stream
from maspo_megatron.rollout.weight_sync.transports import TRANSPORTS, WeightSyncError, resolve_transport_name

READBACK_PROBE = "model.norm.weight"  # a tensor every supported family has, never quantized


@dataclasses.dataclass
class SyncReport:
    """What one sync moved (rank 0 sums over all stage sources)."""

    weight_version: int
    transport: str
    num_tensors: int
    total_bytes: int
    num_buckets: int
    max_bucket_bytes: int
    seconds: float
    verified: bool


class WeightSyncer:
    """cfg: `WeightSyncConfig`; chunks: this rank's model chunks; wmap: `WeightMap` of the policy;
    dims: `ParallelDims`; engine: the rollout engine on global rank 0 (None elsewhere);
    engine_kind: the engine's registry name (known on every rank, from `rollout.engine`): its default transport
    and traits (rollout/registry.py) come from there."""

    def __init__(self, cfg, chunks: Sequence[Any], wmap, dims, *, engine: Optional[Any] = None,
                 engine_kind: str = "local") -> None:
        if engine_kind not in engine_names():
            raise WeightSyncError(f"rollout.engine: {engine_kind!r} is not one of {list(engine_names())}")
        if dist.get_rank() == 0 and engine is None:
            raise WeightSyncError("WeightSyncer: rank 0 (the driver) needs the rollout engine")
        self.cfg = cfg
        self.chunks = list(chunks)
        self.wmap = wmap
        self.dims = dims
        self.engine = engine if dist.get_rank() == 0 else None
        self.engine_kind = engine_kind
        self.transport_name = resolve_transport_name(cfg.transport, engine_kind)
        self.transport = TRANSPORTS[self.transport_name](cfg, dims, self.engine)
        # an in-process engine exposes whole tensors; servers return the first rows only
        self.verify_rows = None if engine_traits(engine_kind).reads_back_whole_tensors else cfg.verify_rows
        # reused bucket memory of the fast path (bucket_writer.py); FP8 goes through the general path
        self._buffers = None if cfg.fp8 else BucketBuffers(cfg.bucket_bytes, device=_params_device(self.chunks))
        self._startup_checks()

    def _startup_checks(self) -> None:
        """Refuses, at start-up and on every rank, what could only fail at the first sync: a transport the
        engine cannot receive (e.g. NCCL into colocated servers), and verify_weights where the engine
        cannot read weights back (sglang 0.5.23 serves /get_weights_by_name for a few model classes only)."""
        error = [None]
        if dist.get_rank() == 0:
            error[0] = self.transport.receiver_error() or self._fp8_shard_error()
            if error[0] is None and self.cfg.verify_weights and hasattr(self.engine, "check_weight_readback"):
                try:
                    self.engine.check_weight_readback(READBACK_PROBE)
                except RuntimeError as exc:
                    error[0] = str(exc)
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            raise WeightSyncError(error[0])

    def _fp8_shard_error(self) -> Optional[str]:
        """FP8 into servers whose TP shards would split a scale block (SGLang fails loading them)."""
        if not self.cfg.fp8 or not hasattr(self.engine, "receiver_tp_sizes"):
            return None
        from maspo_megatron.rollout.weight_sync.fp8_checkpoint import check_tp_blocks, linear_shapes

        block = (self.cfg.fp8_block_size, self.cfg.fp8_block_size)
        for tp_size in sorted(set(self.engine.receiver_tp_sizes.values())):
            problems = check_tp_blocks(linear_shapes(self.wmap.meta), tp_size, block)
            if problems:
                return (f"rollout.weight_sync.fp8: rollout.sglang.tp_size {tp_size} splits FP8 blocks of "
                        f"{len(problems)} weight(s), e.g. {problems[0]}")
        return None

    # ---- the HF stream this rank feeds ---------------------------------------------------------
    def buckets(self):
        """This rank's buckets: shards scattered into reused buffers (bucket_writer.py), or, with FP8, the
        general path (full tensors -> quantize -> iter_buckets). Each bucket must be consumed before the
        one after next is produced (bucket_writer's lifetime contract)."""
        if self._buffers is not None:
            return iter_export_buckets(self.chunks, self.wmap, self.dims, self._buffers,
                                       on_peer_bucket=self.transport.peer_bucket)
        return iter_buckets(self.hf_items(), self.cfg.bucket_bytes)

    def hf_items(self):
        items = megatron_hf_stream(self.chunks, self.wmap, self.dims)
        if self.cfg.fp8:
            block = (self.cfg.fp8_block_size, self.cfg.fp8_block_size) if self.cfg.fp8_block_size else DEFAULT_BLOCK
            items = fp8_stream(items, block=block)
        return items

    # ---- one sync ---------------------------------------------------------------------------------
    def sync(self, weight_version: int) -> Optional[SyncReport]:
        start = time.perf_counter()
        rank0 = dist.get_rank() == 0
        session = False
        if rank0:
            self.engine.pause_generation()
            self.engine.flush_cache()
            session = bool(getattr(self.engine, "begin_weight_update", lambda: False)())
        try:
            dist.barrier()  # no stage may send before the engine is paused
            self.transport.prepare(weight_version)
            stats, sent = self._send_all(weight_version)
            self.transport.finish(weight_version)
            gathered = [None] * dist.get_world_size() if rank0 else None
            dist.gather_object((stats, sent), gathered, dst=0)
        finally:
            if rank0 and session:
                self.engine.end_weight_update()
        report, error = None, [None]
        if rank0:
            try:
                report = self._commit(weight_version, gathered, start)
            except WeightSyncError as exc:  # every rank must stop, not only the driver
                error[0] = str(exc)
        dist.broadcast_object_list(error, src=0)  # also: nobody runs ahead before the engine has the weights
        if error[0] is not None:
            raise WeightSyncError(error[0])
        return report

    def _commit(self, weight_version: int, gathered, start: float) -> SyncReport:
        """Rank 0, after every bucket landed: version, verification, resume generation."""
        self.engine.set_weight_version(weight_version)
        totals = {"num_tensors": 0, "total_bytes": 0, "num_buckets": 0, "max_bucket_bytes": 0}
        all_sent: Dict[str, str] = {}
        for part_stats, part_sent in gathered:
            for key in ("num_tensors", "total_bytes", "num_buckets"):
                totals[key] += part_stats[key]
            totals["max_bucket_bytes"] = max(totals["max_bucket_bytes"], part_stats["max_bucket_bytes"])
            all_sent.update(part_sent)
        if self.cfg.verify_weights:
            held = verify.engine_checksums(self.engine, all_sent, self.verify_rows)
            verify.raise_on_mismatch(verify.compare(all_sent, held), weight_version)
        self.engine.continue_generation()
        return SyncReport(weight_version, self.transport_name, seconds=time.perf_counter() - start,
                          verified=bool(self.cfg.verify_weights), **totals)

    def _send_all(self, weight_version: int):
        stats = {"num_tensors": 0, "total_bytes": 0, "num_buckets": 0, "max_bucket_bytes": 0}
        sent: Dict[str, str] = {}
        source = is_export_source(self.dims)
        for bucket in self.buckets():
            if not source:  # TP peers only feed the gathers; the stream yields nothing here
                raise WeightSyncError("weight sync: a non-source rank produced a bucket (TP layout mismatch)")
            size = bucket_nbytes(bucket)
            stats["num_tensors"] += len(bucket)
            stats["total_bytes"] += size
            stats["num_buckets"] += 1
            stats["max_bucket_bytes"] = max(stats["max_bucket_bytes"], size)
            if self.cfg.verify_weights:
                sent.update(verify.sent_checksums(bucket, self.verify_rows))
            self.transport.send(bucket, weight_version)
            del bucket  # the bucketer's memory bound assumes the consumer lets go before the next one
        return stats, sent

    def close(self) -> None:
        self.transport.close()
        self._buffers = None


def close_rollout(syncer: Optional[WeightSyncer], engine: Optional[Any]) -> None:
    """Shuts the rollout side down in order: the syncer first, because its close still talks to the engine
    (distributed: /destroy_weights_update_group on every server, collectively with the stage sources),
    then the engine, even when the syncer's close failed. Every rank calls it (engine: rank 0's or None)."""
    try:
        if syncer is not None:
            syncer.close()
    finally:
        if engine is not None:
            engine.shutdown()


def _params_device(chunks) -> Any:
    for chunk in chunks:
        for param in chunk.parameters():
            return param.device
    return None
