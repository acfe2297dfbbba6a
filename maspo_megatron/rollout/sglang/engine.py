"""`SGLangEngine`: the `RolloutEngine` over SGLang servers (launched here, or external URLs).

The trainer calls it synchronously; the asyncio client runs on a private event-loop thread, so
`abort()` may be called from any thread while `generate()` blocks in another.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine, Mapping, Optional, Sequence, TypeVar

from maspo_megatron.rollout.sglang.client import EndpointMissing, SGLangClient
from maspo_megatron.rollout.sglang.launcher import ServerLauncher
from maspo_megatron.rollout.types import RolloutError, Sample, SamplingParams

T = TypeVar("T")

__all__ = ["EndpointMissing", "SGLangEngine"]


class SGLangEngine:
    """cfg: `SGLangConfig`. With `cfg.urls` empty, launches `cfg.num_servers` servers of `model_path`."""

    def __init__(self, cfg, *, model_path: Optional[str] = None, weight_version: int = 0) -> None:
        self.cfg = cfg
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
        (SGLang refuses to flush then)."""
        self._run(self.client.flush_cache(timeout_s))

    def release_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        self._run(self.client.post("/release_memory_occupation", {"tags": list(tags) if tags else None}))

    def resume_memory_occupation(self, tags: Optional[Sequence[str]] = None) -> None:
        self._run(self.client.post("/resume_memory_occupation", {"tags": list(tags) if tags else None}))

    # ---- low-level helpers for weight transports --------------------------------------------------
    def post(self, endpoint: str, payload: Any = None, *, urls: Optional[Sequence[str]] = None, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """POST the same payload to every worker (or `urls`) -> {url: body}; 404 raises EndpointMissing."""
        return self._run(self.client.post(endpoint, payload, urls=urls, timeout_s=timeout_s))

    def post_each(self, endpoint: str, payloads: Mapping[str, Any], *, timeout_s: Optional[float] = None) -> dict[str, Any]:
        """POST payloads[url] to each url concurrently (e.g. per-server CUDA IPC handles)."""
        return self._run(self.client.post_each(endpoint, payloads, timeout_s=timeout_s))

    def get(self, endpoint: str, *, urls: Optional[Sequence[str]] = None) -> dict[str, Any]:
        return self._run(self.client.get(endpoint, urls=urls))

    def begin_weight_update(self) -> bool:
        """Opens the 0.5.23 weight-update session on every server; False for older servers."""
        return self._run(self.client.begin_weight_update())

    def end_weight_update(self) -> None:
        self._run(self.client.end_weight_update())

    def update_weights_from_tensor(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        """payloads[url] = UpdateWeightsFromTensorReqInput body for that server."""
        return self.post_each("/update_weights_from_tensor", payloads)

    def update_weights_from_distributed(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return self.post("/update_weights_from_distributed", dict(payload))

    def update_weights_from_disk(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        return self.post("/update_weights_from_disk", dict(payload))

    def init_weights_update_group(self, payloads: Mapping[str, Any]) -> dict[str, Any]:
        """payloads[url] carries that server's rank_offset."""
        return self.post_each("/init_weights_update_group", payloads)

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> dict[str, Any]:
        return self.post("/get_weights_by_name", {"name": name, "truncate_size": truncate_size})

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
