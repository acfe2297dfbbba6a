"""Live weight sync Megatron -> rollout engines (docs/weight_sync.md).

    syncer = WeightSyncer(cfg.rollout.weight_sync, chunks, wmap, dims, engine=engine, engine_kind="local")
    report = syncer.sync(weight_version=step)

Pieces: `iter_export_buckets` (TP shards scattered into reused `BucketBuffers`; on one CPU host a /dev/shm
bucket shared by the TP group, each rank writing its own shards; the path without FP8),
or `megatron_hf_stream` (TP gather, own layers, HF names) -> `fp8_stream` -> `iter_buckets`; then a transport from `TRANSPORTS` (local, disk, tensor, distributed); `verify_weights`
checksums; `flatten_tensors` / `serialize_payload` / `load_payload` for SGLang's flattened buckets.
"""
from maspo_megatron.rollout.weight_sync.bucket_writer import (
    BucketBuffers,
    iter_export_buckets,
    plan_buckets,
    scatter_shard,
    scatter_shards,
)
from maspo_megatron.rollout.weight_sync.bucketing import bucket_nbytes, iter_buckets
from maspo_megatron.rollout.weight_sync.flattened_bucket import (
    FlattenedTensorMetadata,
    flatten_tensors,
    load_payload,
    reconstruct_tensors,
    serialize_payload,
)
from maspo_megatron.rollout.weight_sync.fp8 import dequantize_blockwise, fp8_stream, quantize_blockwise
from maspo_megatron.rollout.weight_sync.hf_stream import megatron_hf_stream
from maspo_megatron.rollout.weight_sync.syncer import SyncReport, WeightSyncer
from maspo_megatron.rollout.weight_sync.transports import TRANSPORTS, WeightSyncError, register_transport

__all__ = [
    "TRANSPORTS", "BucketBuffers", "FlattenedTensorMetadata", "SyncReport", "WeightSyncError", "WeightSyncer", "bucket_nbytes",
    "dequantize_blockwise", "flatten_tensors", "fp8_stream", "iter_buckets", "iter_export_buckets", "load_payload", "megatron_hf_stream",
    "plan_buckets", "quantize_blockwise", "reconstruct_tensors", "register_transport", "scatter_shard", "scatter_shards",
    "serialize_payload",
]
