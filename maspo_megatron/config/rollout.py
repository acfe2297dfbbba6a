"""Rollout engines and the weight transport between trainer and engines.

The engine and transport names belong to their registries (rollout/registry.py,
rollout/weight_sync/transports), never to a list typed here. config/ sits on a lower floor than
rollout/ (tests/test_import_layers.py) and cannot read them: `check_rollout_names` does, first
thing when the trainer starts, with the same one-line errors.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class SGLangConfig:
    urls: List[str] = option(factory=list, help="external servers (or a router) to use instead of launching")
    num_servers: int = option(1, ge=1, help="servers to launch when urls is empty")
    tp_size: int = option(1, ge=1)
    dp_size: int = option(1, ge=1)
    mem_fraction_static: float = option(0.8, gt=0, le=1)
    enable_memory_saver: bool = option(False, help="needed to release/resume memory when colocated")
    colocated: Optional[bool] = option(
        None, help="the servers share the trainer's GPUs (default: true when launched by the trainer, false for urls); "
                   "with enable_memory_saver their memory is released while Megatron trains (docs/rollout.md)")
    quantization: Optional[str] = option(None, help="e.g. fp8")
    host: str = option("127.0.0.1", help="interface servers bind to; never 0.0.0.0 by default")
    api_key: Optional[str] = None
    router: bool = option(False, help="start sglang_router in front of the servers")
    extra_args: List[str] = option(factory=list, help="passed verbatim to sglang.launch_server")
    startup_timeout_s: float = option(600.0, gt=0)
    request_timeout_s: float = option(600.0, gt=0)
    max_concurrency: int = option(256, ge=1, help="samples in flight at once over all servers")
    samples_per_request: int = option(
        32, ge=1,
        help="samples coalesced into one batched /generate request (SGLang batch form, per-sample seeds); 1: one "
             "request per sample. A batch answers when its slowest item ends, so larger values cost tail latency; "
             "always 1 through a router (docs/rollout.md)")
    max_retries: int = option(3, ge=0)
    connect_timeout_s: float = option(10.0, gt=0)
    abort_grace_s: float = option(5.0, ge=0, help="how long an aborted request may take to return its partial output")
    router_url: Optional[str] = option(None, help="external sglang_router in front of urls (generation goes there)")
    router_extra_args: List[str] = option(factory=list, help="passed verbatim to sglang_router.launch_router")
    launch_command: List[str] = option(factory=list, help="argv prefix replacing `python -m sglang.launch_server`")
    base_gpu_id: int = option(0, ge=0, help="first GPU of server 0; server i starts at base + i * tp_size * dp_size")
    log_dir: Optional[str] = option(None, help="server logs (default: a fresh temp dir)")
    pause_mode: str = option("abort", choices=("abort", "retract", "in_place"), help="/pause_generation mode")
    deterministic_inference: bool = option(
        False, help="--enable-deterministic-inference: the per-sample sampling_seed then fixes each sample, so a "
                    "resumed run draws the same samples; without it SGLang ignores the seed (slower, docs/rollout.md)")


@dataclasses.dataclass
class WeightSyncConfig:
    transport: str = option("auto",
                            help="auto: local for the CPU engine, tensor (CUDA) or disk for SGLang")
    bucket_bytes: int = option(512 * 1024**2, ge=1, help="HF tensors per transfer; a fused group is never split")
    every_steps: int = option(1, ge=1, help="sync after every k-th RL step; k > 1 leaves the engine up to k - 1 "
                              "steps stale (off-policy experiments, docs/experiments.md); a step that evaluates, "
                              "saves, exports or ends the run always syncs")
    verify_weights: bool = option(False, help="checksum what the engine holds after each sync")
    verify_rows: int = option(100, ge=1, help="rows per tensor compared on an engine that reads back the first "
                              "rows only (SGLang: /get_weights_by_name truncate_size)")
    disk_dir: Optional[str] = option(None, help="shared directory for the disk transport")
    fp8: bool = option(False, help="blockwise FP8 (e4m3) linear weights + weight_scale_inv, for FP8 engines")
    fp8_block_size: int = option(128, ge=1, help="FP8 scale block edge (HF weight_block_size [b, b])")
    master_address: str = option("127.0.0.1", help="address the engines reach this node at (distributed transport)")
    group_timeout_s: float = option(600.0, gt=0, help="rendezvous timeout of the distributed transport's groups")


@dataclasses.dataclass
class RolloutConfig:
    engine: str = option("local", help="rollout engine, by registry name (rollout/registry.py)")
    n_samples_per_prompt: int = option(8, ge=1)
    temperature: float = option(1.0, gt=0)
    top_p: float = option(1.0, gt=0, le=1)
    top_k: int = option(-1, ge=-1, help="-1: off")
    max_new_tokens: int = option(256, ge=1)
    local_batch_size: int = option(64, ge=1, help="sequences per forward in the in-process engine")
    local_dtype: str = option("auto", choices=("auto", "fp32", "bf16"),
                              help="in-process engine precision: auto = bf16 on a GPU, fp32 on the CPU")
    seed: int = option(1234, ge=0, help="base seed of the local engine's per-sequence sampling streams")
    colocated_offload: bool = option(
        False, help="move the trainer's optimizer state, gradient buffers and parameters to the host while colocated "
                    "SGLang servers generate (trainer/offload.py; costs host memory and two copies per step)")
    sglang: SGLangConfig = option(factory=SGLangConfig)
    weight_sync: WeightSyncConfig = option(factory=WeightSyncConfig)
