"""Asyncio HTTP client for a fleet of SGLang servers (aiohttp).

- `generate`: samples are coalesced into batched `/generate` requests of up to `samples_per_request`
  items (SGLang's batch form, one sampling dict and seed per item; 1, or a router, = one request per
  sample), at most `max_concurrency` SAMPLES in flight, each request sent to the least-loaded live
  server (counted in samples); connection errors, timeouts and 5xx mark that server down for a
  cooldown and retry the whole group on another one, up to `max_retries` times; 4xx is a schema bug
  and fails at once with the server's message.
- `abort`: every in-flight `generate` returns promptly: the servers get `/abort_request
  {"abort_all": true}` and answer with `finish_reason.type == "abort"`; what has not answered within
  `abort_grace_s` (dead server) and what had not started becomes an empty "abort" sample.
- `post` / `post_each` / `get`: control-plane calls to every worker (pause, flush, weight updates);
  a 404 raises `EndpointMissing` so callers can detect servers without an endpoint.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import math
import time
from typing import Any, Mapping, Optional, Sequence

import aiohttp

from maspo_megatron.rollout.local.sampling import sequence_seed
from maspo_megatron.rollout.sglang.protocol import (
    encode_items,
    encode_request,
    parse_batch_response,
    parse_generate_response,
)
from maspo_megatron.rollout.types import RolloutError, Sample, SamplingParams

_JSON_HEADERS = {"Content-Type": "application/json"}
_RETRYABLE = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, asyncio.TimeoutError, ConnectionError)


class EndpointMissing(RolloutError):
    """The server answered 404: it has no such endpoint (e.g. an SGLang older than the feature)."""


class SampleBudget:
    """A counting semaphore acquired k units at a time, first come first served (a group of k
    samples takes k of the `max_concurrency` places at once, so partial holds cannot deadlock)."""

    def __init__(self, capacity: int) -> None:
        self.available = capacity
        self._waiters: collections.deque = collections.deque()

    async def acquire(self, count: int) -> None:
        if not self._waiters and self.available >= count:
            self.available -= count
            return
        waiter = (count, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await waiter[1]
        except asyncio.CancelledError:
            if waiter[1].done() and not waiter[1].cancelled():
                self.release(count)  # granted just as it was cancelled: give the places back
            else:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass
                self._wake()
            raise

    def release(self, count: int) -> None:
        self.available += count
        self._wake()

    def _wake(self) -> None:
        while self._waiters and (self._waiters[0][1].done() or self._waiters[0][0] <= self.available):
            count, future = self._waiters.popleft()
            if future.done():  # cancelled while queued
                continue
            self.available -= count
            future.set_result(None)


@dataclasses.dataclass
class _Server:
    url: str
    in_flight: int = 0
    down_until: float = 0.0
    failures: int = 0


@dataclasses.dataclass(eq=False)
class _Call:
    """One `generate` call: its per-group tasks and its abort state."""

    tasks: list = dataclasses.field(default_factory=list)
    aborted: bool = False
    watchdog: Optional[asyncio.Task] = None


def _aborted(weight_version: int) -> Sample:
    return Sample(token_ids=[], log_probs=[], finish_reason="abort", weight_version=weight_version)


class SGLangClient:
    """Talks to `worker_urls` (control plane) and to `router_url` or the workers (generation).

    Create and use it inside one event loop; `close()` when done.
    """

    def __init__(
        self,
        worker_urls: Sequence[str],
        *,
        router_url: Optional[str] = None,
        api_key: Optional[str] = None,
        max_concurrency: int = 256,
        samples_per_request: int = 32,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        down_cooldown_s: float = 2.0,
        abort_grace_s: float = 5.0,
    ) -> None:
        if not worker_urls and not router_url:
            raise ValueError("rollout.sglang.urls: no server URL to talk to")
        self.worker_urls = [u.rstrip("/") for u in worker_urls]
        self.router_url = router_url.rstrip("/") if router_url else None
        self._servers = [_Server(u) for u in ([self.router_url] if self.router_url else self.worker_urls)]
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_concurrency = max_concurrency
        if samples_per_request < 1:
            raise ValueError(f"rollout.sglang.samples_per_request: {samples_per_request} must be >= 1")
        self.samples_per_request = samples_per_request
        self.request_timeout_s = request_timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.down_cooldown_s = down_cooldown_s
        self.abort_grace_s = abort_grace_s
        self._session: Optional[aiohttp.ClientSession] = None
        self._budget: Optional[SampleBudget] = None
        self._calls: set[_Call] = set()
        self._round_robin = 0
        self.weight_update_session_supported: Optional[bool] = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, force_close=False)
            self._session = aiohttp.ClientSession(connector=connector, headers=self._headers)
            self._budget = SampleBudget(self.max_concurrency)
        return self._session

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()

    def _timeout(self, total_s: Optional[float] = None) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=total_s or self.request_timeout_s, sock_connect=self.connect_timeout_s)

    @staticmethod
    async def _read_body(response: aiohttp.ClientResponse) -> Any:
        raw = await response.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode("utf-8", "replace")

    # ---- generation ------------------------------------------------------------------------------
    async def generate(
        self, prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams, *, weight_version: int = 0
    ) -> list[list[Sample]]:
        """prompts[P][len] -> P lists of n samples, in order. Raises RolloutError if a sample fails."""
        await self._get_session()
        items = self._sample_items(prompts, n, sampling)
        size = self._group_size(len(items))
        groups = [items[i : i + size] for i in range(0, len(items), size)]
        call = _Call()
        self._calls.add(call)
        call.tasks = [asyncio.ensure_future(self._generate_group(group, call, weight_version)) for group in groups]
        try:
            pending = set(call.tasks)
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_EXCEPTION)
                failed = [t for t in done if not t.cancelled() and t.exception() is not None]
                if failed:
                    raise failed[0].exception()
        except BaseException:
            for task in call.tasks:
                task.cancel()
            await asyncio.gather(*call.tasks, return_exceptions=True)
            raise
        finally:
            self._calls.discard(call)
            if call.watchdog is not None:
                call.watchdog.cancel()
        # Groups cancelled by the abort watchdog (no answer within abort_grace_s) are empty aborts.
        samples = []
        for task, group in zip(call.tasks, groups, strict=True):
            samples.extend([_aborted(weight_version) for _ in group] if task.cancelled() else task.result())
        return [samples[p * n : (p + 1) * n] for p in range(len(prompts))]

    @staticmethod
    def _sample_items(prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams) -> list[tuple[str, str]]:
        """(input_ids JSON, sampling_params JSON) per sample, prompt-major; each sample has its own seed."""
        seeds = None
        if sampling.seed is not None:
            seeds = [[sequence_seed(sampling.seed, p, s) for s in range(n)] for p in range(len(prompts))]
        return encode_items(prompts, n, sampling, seeds)

    def _group_size(self, total: int) -> int:
        """Samples per request: `samples_per_request`, at most `max_concurrency`, and small enough that
        every server gets a share of a small call. A router gets one sample per request: it is not
        known to forward a batch with per-item sampling params intact (docs/rollout.md)."""
        if self.router_url or self.samples_per_request == 1:
            return 1
        share = math.ceil(total / max(1, len(self._servers)))
        return max(1, min(self.samples_per_request, self.max_concurrency, share))

    def _pick_server(self) -> tuple[_Server, float]:
        """The least-loaded live server, or (when all are down) the first to come back and its wait."""
        now = time.monotonic()
        live = [s for s in self._servers if s.down_until <= now]
        if live:
            self._round_robin += 1
            rotated = live[self._round_robin % len(live) :] + live[: self._round_robin % len(live)]
            return min(rotated, key=lambda s: s.in_flight), 0.0
        # All down: retry the first to come back after a short backoff, not its full cooldown, so a
        # dead fleet fails after max_retries quick attempts instead of sleeping.
        soonest = min(self._servers, key=lambda s: s.down_until)
        return soonest, min(soonest.down_until - now, 0.5)

    def _mark_down(self, server: _Server) -> None:
        server.failures += 1
        server.down_until = time.monotonic() + self.down_cooldown_s * 2 ** min(server.failures - 1, 3)

    async def _generate_group(self, items: list[tuple[str, str]], call: _Call, weight_version: int) -> list[Sample]:
        """One request for `items` (a single sample, or a batch), retried whole on failure."""
        assert self._budget is not None
        count = len(items)
        payload = encode_request(items)
        await self._budget.acquire(count)
        try:
            errors = []
            for _attempt in range(self.max_retries + 1):
                if call.aborted:
                    return [_aborted(weight_version) for _ in range(count)]
                server, wait_s = self._pick_server()
                if wait_s > 0:
                    await asyncio.sleep(wait_s)
                server.in_flight += count
                try:
                    status, body = await self._post_json(server.url + "/generate", payload)
                except _RETRYABLE as exc:
                    self._mark_down(server)
                    errors.append(f"{server.url}: {type(exc).__name__}: {exc}")
                    continue
                finally:
                    server.in_flight -= count
                if status == 200:
                    server.failures = 0
                    if count == 1:
                        return [parse_generate_response(body, url=server.url, default_weight_version=weight_version)]
                    return parse_batch_response(body, count, url=server.url, default_weight_version=weight_version)
                if 400 <= status < 500:
                    raise RolloutError(f"{server.url}/generate: HTTP {status} (request rejected): {str(body)[:300]}")
                self._mark_down(server)
                errors.append(f"{server.url}: HTTP {status}: {str(body)[:200]}")
            if call.aborted:
                return [_aborted(weight_version) for _ in range(count)]
            raise RolloutError(f"/generate ({count} samples) failed {self.max_retries + 1} times; errors: {'; '.join(errors)}")
        finally:
            self._budget.release(count)

    async def _post_json(self, url: str, data: bytes) -> tuple[int, Any]:
        session = await self._get_session()
        async with session.post(url, data=data, headers=_JSON_HEADERS, timeout=self._timeout()) as response:
            return response.status, await self._read_body(response)

    async def abort(self) -> None:
        """Ends every in-flight `generate` (see the module docstring)."""
        for call in list(self._calls):
            call.aborted = True
            if call.watchdog is None:
                call.watchdog = asyncio.ensure_future(self._cancel_after_grace(call))
        await self.post("/abort_request", {"abort_all": True}, ignore_errors=True, timeout_s=self.connect_timeout_s)

    async def _cancel_after_grace(self, call: _Call) -> None:
        await asyncio.sleep(self.abort_grace_s)
        for task in call.tasks:
            task.cancel()

    # ---- control plane ---------------------------------------------------------------------------
    async def _call(self, method: str, url: str, payload: Any, timeout_s: Optional[float]) -> Any:
        session = await self._get_session()
        async with session.request(method, url, json=payload, timeout=self._timeout(timeout_s)) as response:
            body = await self._read_body(response)
            if response.status == 404:
                raise EndpointMissing(f"{url}: HTTP 404 (the server has no such endpoint)")
            if response.status != 200:
                raise RolloutError(f"{url}: HTTP {response.status}: {str(body)[:500]}")
            return body

    async def post_each(
        self, endpoint: str, payloads: Mapping[str, Any], *, ignore_errors: bool = False, timeout_s: Optional[float] = None
    ) -> dict[str, Any]:
        """POSTs `payloads[url]` to `url + endpoint` for every url, concurrently -> {url: parsed body}."""
        urls = [u.rstrip("/") for u in payloads]
        results = await asyncio.gather(
            *(self._call("POST", u + endpoint, payloads[raw], timeout_s) for u, raw in zip(urls, payloads, strict=True)),
            return_exceptions=True,
        )
        if not ignore_errors:
            for result in results:
                if isinstance(result, BaseException):
                    raise result
        return dict(zip(urls, results, strict=True))

    async def post(
        self,
        endpoint: str,
        payload: Any = None,
        *,
        urls: Optional[Sequence[str]] = None,
        ignore_errors: bool = False,
        timeout_s: Optional[float] = None,
    ) -> dict[str, Any]:
        """POSTs the same `payload` to every worker (or `urls`) -> {url: parsed body}."""
        targets = list(urls) if urls is not None else self.worker_urls
        return await self.post_each(endpoint, {u: payload for u in targets}, ignore_errors=ignore_errors, timeout_s=timeout_s)

    async def get(self, endpoint: str, *, urls: Optional[Sequence[str]] = None) -> dict[str, Any]:
        targets = [u.rstrip("/") for u in (urls if urls is not None else self.worker_urls)]
        results = await asyncio.gather(*(self._call("GET", u + endpoint, None, None) for u in targets))
        return dict(zip(targets, results, strict=True))

    async def flush_cache(self, timeout_s: float = 5.0) -> None:
        """`/flush_cache` on every worker. SGLang refuses (400) while requests are queued or running,
        e.g. for a moment after an abort-mode pause; retry until `timeout_s`, then raise."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.worker_urls)
        while True:
            results = await self.post("/flush_cache", None, urls=pending, ignore_errors=True)
            errors = {u: r for u, r in results.items() if isinstance(r, BaseException)}
            hard = [r for r in errors.values() if "HTTP 400" not in str(r)]
            if not errors:
                return
            if hard or time.monotonic() > deadline:
                raise next(iter(errors.values()))
            pending = list(errors)
            await asyncio.sleep(0.1)

    async def begin_weight_update(self) -> bool:
        """Opens a weight-update session on every worker; False when the servers predate the endpoint
        (sglang < 0.5.23: updates are then sent without a session)."""
        if self.weight_update_session_supported is False:
            return False
        results = await self.post("/begin_weight_update", {}, ignore_errors=True)
        missing = [u for u, r in results.items() if isinstance(r, EndpointMissing)]
        failed = [r for r in results.values() if isinstance(r, BaseException) and not isinstance(r, EndpointMissing)]
        if failed:
            raise failed[0]
        if missing and len(missing) != len(results):
            raise RolloutError(f"/begin_weight_update exists on some servers only (missing on {missing}): mixed SGLang versions")
        self.weight_update_session_supported = not missing
        return self.weight_update_session_supported

    async def end_weight_update(self) -> None:
        if self.weight_update_session_supported:
            await self.post("/end_weight_update", {})
