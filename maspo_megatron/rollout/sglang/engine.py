"""`SGLangEngine`: the `RolloutEngine` over SGLang servers (launched here, or external URLs).

The trainer calls it synchronously; the asyncio client runs on a private event-loop thread, so
`abort()` may be called from any thread while `generate()` blocks in another.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import threading
from typing import Any, Coroutine, Mapping, Optional, Sequence, TypeVar

from maspo_megatron.rollout.sglang import protocol
from maspo_megatron.rollout.sglang.client import EndpointMissing, SGLangClient
from maspo_megatron.rollout.sglang.launcher import ServerLauncher, ipc_routes, plan_servers
from maspo_megatron.rollout.types import RolloutError, Sample, SamplingParams

T = TypeVar("T")

__all__ = ["EndpointMissing", "SGLangEngine"]


class SGLangEngine:
    """cfg: `SGLangConfig`. With `cfg.urls` empty, launches `cfg.num_servers` servers of `model_path`."""

    def __init__(self, cfg, *, model_path: Optional[str] = None, weight_version: int = 0) -> None:
        self.cfg = cfg
        self.model_path = model_path
        self._mixed_dtypes: Optional[bool] = None
        self._released: set[str] = set()  # memory tags released on the servers (colocated handover)
        self._weight_version = int(weight_version)
        self.launcher: Optional[ServerLauncher] = None
        if cfg.urls:
            worker_urls, router_url = list(cfg.urls), cfg.router_url
        else:
            self.launcher = ServerLauncher(cfg, model_path)
            worker_urls, router_url = self.launcher.launch()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-client", daemon=True)
        self._thread.start()
        self.client = SGLangClient(
            worker_urls,
            router_url=router_url,
            api_key=cfg.api_key,
            max_concurrency=cfg.max_concurrency,
            samples_per_request=cfg.samples_per_request,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            max_retries=cfg.max_retries,
            abort_grace_s=cfg.abort_grace_s,
        )

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coroutine.close()
            raise RolloutError("SGLangEngine: used after shutdown()")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def worker_urls(self) -> list[str]:
        return list(self.client.worker_urls)

    # ---- interface -------------------------------------------------------------------------------
    @property
    def weight_version(self) -> int:
        return self._weight_version

    def set_weight_version(self, weight_version: int) -> None:
        """Called by weight sync after a successful update (samples then carry this version unless the
        server reports its own numeric `weight_version`)."""
        self._weight_version = int(weight_version)

    def generate(self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[list[Sample]]:
        if n < 1:
            raise ValueError(f"n: {n} must be >= 1")
        return self._run(self.client.generate(prompts, n, sampling, weight_version=self._weight_version))

    def abort(self) -> None:
        """Makes every in-flight `generate` return promptly (unfinished samples: finish_reason "abort")."""
        self._run(self.client.abort())

    def pause_generation(self, mode: Optional[str] = None) -> None:
        self._run(self.client.post("/pause_generation", {"mode": mode or self.cfg.pause_mode}))

    def continue_generation(self) -> None:
        self._run(self.client.post("/continue_generation", {}))

    def flush_cache(self, timeout_s: float = 5.0) -> None:
        """Raises RolloutError if a server still has queued or running requests after `timeout_s`
        (SGLang refuses to flush then). Skipped while the KV cache is released (releasing flushed it)."""
        if protocol.MEMORY_KV_CACHE in self._released:
            return
        self._run(self.client.flush_cache(timeout_s))

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        """tags: of `protocol.MEMORY_TAGS`; None = all (needs --enable-memory-saver and an idle server)."""
        self._run(self.client.post("/release_memory_occupation", {"tags": list(tags) if tags else None}))
        self._released |= set(tags or protocol.MEMORY_TAGS)

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        self._run(self.client.post("/resume_memory_occupation", {"tags": list(tags) if tags else None}))
        self._released -= set(tags or protocol.MEMORY_TAGS)

    # ---- low-level control plane ----------------------------------------------------------------------
    def post(self, endpoint: str, payload: Any = None, *, urls: Optional[Sequence[str]] = None, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """POST the same payload to every worker (or `urls`) -> {url: body}; 404 raises EndpointMissing."""
        return self._run(self.client.post(endpoint, payload, urls=urls, timeout_s=timeout_s))

    def post_each(self, endpoint: str, payloads: Mapping[str, Any], *, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """POST payloads[url] to each url concurrently."""
        return self._run(self.client.post_each(endpoint, payloads, timeout_s=timeout_s))

    def get(self, endpoint: str, *, urls: Optional[Sequence[str]] = None) -> dict[str, Any]:
        return self._run(self.client.get(endpoint, urls=urls))

    # ---- the weight receiver (rollout/weight_sync/receiver.py): transports hand over bytes, the bodies
    # are built here (protocol.py) --------------------------------------------------------------------------
    @property
    def shares_trainer_gpus(self) -> bool:
        """The servers run on the training GPUs: `rollout.sglang.colocated`, by default true for servers this
        job launched and false for external URLs."""
        return self.launcher is not None if self.cfg.colocated is None else bool(self.cfg.colocated)

    # ---- colocated memory handover (trainer/loop.py calls these on the driver) --------------------------
    # One step on shared GPUs: rollout (SGLang holds weights + KV cache) -> before_train: SGLang releases
    # everything -> Megatron trains -> every rank empties its CUDA cache -> after_train: SGLang maps its
    # weights again (their contents are stale) -> the weight sync fills them (the trainer's bucket buffers
    # are alive now, the KV cache is not yet) -> after_weight_sync: SGLang maps its KV cache (and CUDA
    # graphs) -> the next rollout. Neither side holds its peak while the other holds its own.
    @property
    def hands_over_memory(self) -> bool:
        return self.shares_trainer_gpus and bool(self.cfg.enable_memory_saver)

    def before_train(self) -> None:
        if self.hands_over_memory:
            self.release_memory_occupation(list(protocol.MEMORY_TAGS))

    def after_train(self) -> None:
        if self.hands_over_memory:
            self.resume_memory_occupation([protocol.MEMORY_WEIGHTS])

    def after_weight_sync(self) -> None:
        if self.hands_over_memory:
            self.resume_memory_occupation([t for t in protocol.MEMORY_TAGS if t != protocol.MEMORY_WEIGHTS])

    @property
    def data_parallel_size(self) -> int:
        return int(self.cfg.dp_size)

    @property
    def receiver_tp_sizes(self) -> dict[str, int]:
        """url -> how many SGLang TP ranks that server has (each needs its own payload / group rank)."""
        return {url: int(self.cfg.tp_size) for url in self.client.worker_urls}

    def ipc_routes(self, rank_of_gpu: Mapping[tuple, int]) -> dict[str, list[int]]:
        """url -> the trainer rank whose bucket copy each TP rank of that server maps (CUDA IPC stays on
        one GPU of one node). The servers are placed as the colocated fleet places them (`plan_servers`:
        the same number on every trainer node, node-major, from base_gpu_id on); `rank_of_gpu[(node, gpu)]`
        is where each trainer rank runs. ValueError naming the config keys when they do not fit."""
        if self.cfg.dp_size > 1:  # payload r is opened by TP rank r of EVERY replica, each on its own GPU
            raise ValueError("weight_sync.transport 'tensor' does not support rollout.sglang.dp_size > 1 (one payload "
                             "per TP rank serves every DP replica): use dp_size 1 and more servers (num_servers)")
        urls = self.worker_urls
        num_nodes = 1 + max(node for node, _ in rank_of_gpu)
        if len(urls) % num_nodes:
            raise ValueError(f"rollout.sglang: {len(urls)} servers cannot be spread evenly over {num_nodes} trainer "
                             "nodes for weight_sync.transport 'tensor' (CUDA IPC needs each server on a trainer node)")
        per_node = dataclasses.replace(self.cfg, num_servers=len(urls) // num_nodes)
        gpus_needed = per_node.base_gpu_id + per_node.num_servers * per_node.tp_size * per_node.dp_size
        return ipc_routes(plan_servers(per_node, num_nodes, gpus_needed), urls, dict(rank_of_gpu))

    @property
    def accepts_mixed_dtype_buckets(self) -> bool:
        """A flattened bucket may mix dtypes when every server's FlattenedTensorBucket has
        `supports_multi_dtypes` (checked in 0.5.23's source, tensor_bucket.py); for a server that reports an
        older or unknown version (`/server_info`), buckets are sent one dtype at a time."""
        if self._mixed_dtypes is None:
            versions = [body.get("version") if isinstance(body, dict) else None
                        for body in self.get("/server_info").values()]
            self._mixed_dtypes = all(protocol.version_at_least(v, protocol.MIXED_DTYPE_BUCKETS_SINCE) for v in versions)
        return self._mixed_dtypes

    def begin_weight_update(self) -> bool:
        """Opens the 0.5.23 weight-update session on every server; False for older servers."""
        return self._run(self.client.begin_weight_update())

    def end_weight_update(self) -> None:
        self._run(self.client.end_weight_update())

    def load_serialized_buckets(self, payloads: Mapping[str, Sequence[str]], weight_version: int,
                                load_format: str) -> None:
        """`payloads[url][r]`: the serialized bucket SGLang TP rank r of that server opens."""
        bodies = {url: protocol.tensor_update_body(per_rank, weight_version, load_format) for url, per_rank in payloads.items()}
        protocol.check_update_answers(self.post_each("/update_weights_from_tensor", bodies), "update_weights_from_tensor")

    def broadcast_group_size(self) -> int:
        """Ranks of a weight-broadcast group: the source (rank 0) and every TP rank of every server."""
        return 1 + sum(self.receiver_tp_sizes.values())

    def init_broadcast_group(self, group_name: str, master_address: str, master_port: int, backend: str) -> None:
        """Every server joins `group_name` (server i's TP rank r as 1 + i * tp_size + r) at the source's store."""
        bodies, offset = {}, 1
        for url, tp_size in self.receiver_tp_sizes.items():
            bodies[url] = protocol.init_group_body(group_name, master_address, master_port, offset,
                                                   self.broadcast_group_size(), backend)
            offset += tp_size
        protocol.check_update_answers(self.post_each("/init_weights_update_group", bodies), "init_weights_update_group")

    def load_broadcast_bucket(self, group_name: str, names: Sequence[str], dtypes: Sequence[str],
                              shapes: Sequence[Sequence[int]], weight_version: int) -> None:
        """Returns when every server has received the tensors the source broadcasts on `group_name`."""
        body = protocol.broadcast_update_body(group_name, names, dtypes, shapes, weight_version)
        protocol.check_update_answers(self.post("/update_weights_from_distributed", body), "update_weights_from_distributed")

    def destroy_broadcast_group(self, group_name: str) -> None:
        protocol.check_update_answers(self.post("/destroy_weights_update_group", protocol.destroy_group_body(group_name)),
                                      "destroy_weights_update_group")

    def load_from_disk(self, model_path: str, weight_version: int) -> None:
        """Every server loads the HF safetensors directory `model_path` (readable by all of them)."""
        body = protocol.disk_update_body(model_path, weight_version)
        protocol.check_update_answers(self.post("/update_weights_from_disk", body), "update_weights_from_disk")

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> dict[str, Any]:
        """url -> the first `truncate_size` rows of `name` as floats (only some model classes serve it)."""
        return self.post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

    def served_architectures(self) -> list[str]:
        """The HF architectures of the served model (its config.json), [] when not readable from here."""
        path = self.model_path
        if path is None:
            try:
                path = next(iter(self.get("/model_info", urls=self.worker_urls[:1]).values())).get("model_path")
            except (RolloutError, AttributeError, StopIteration):
                return []
        try:
            with open(os.path.join(str(path), "config.json")) as handle:
                return list(json.load(handle).get("architectures") or [])
        except (OSError, ValueError, TypeError):
            return []

    def check_weight_readback(self, probe_name: str) -> None:
        """Raises RolloutError (naming the model class) when the servers cannot answer /get_weights_by_name,
        which verify_weights needs: sglang 0.5.23 implements it for a few model classes only."""
        try:
            self.get_weights_by_name(probe_name, truncate_size=1)
            return
        except RolloutError as exc:
            error = exc
        served = self.served_architectures() or ["(unknown: config.json not readable here)"]
        raise RolloutError(
            f"rollout.weight_sync.verify_weights: the SGLang servers cannot read weights back ({error}); sglang 0.5.23 "
            f"implements /get_weights_by_name only for {sorted(protocol.WEIGHTS_BY_NAME_ARCHITECTURES)}, the served "
            f"model is {', '.join(served)}: set rollout.weight_sync.verify_weights=false") from None

    def shutdown(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self.client.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            if self.launcher is not None:
                self.launcher.shutdown()
