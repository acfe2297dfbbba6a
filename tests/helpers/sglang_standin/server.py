"""The stand-in server: state, routes, auth, health, pause/continue/flush, memory release/resume,
in-process start/stop and the command line (`python tests/helpers/sglang_standin ...`)."""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from typing import Any, Optional

from aiohttp import web

from tests.helpers import sglang_source
from tests.helpers.sglang_standin.generation import GenerationMixin
from tests.helpers.sglang_standin.schema import BadRequest, check_fields
from tests.helpers.sglang_standin.weights import WeightsMixin, error_response

MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


def check_routes_exist(app: web.Application) -> None:
    """Every route the stand-in serves exists, with that method, in sglang's http_server.py (when its
    source is here): a client test that passes here cannot rely on an endpoint the real server lacks."""
    if sglang_source.sglang_root() is None:
        return
    real = sglang_source.routes()
    for route in app.router.routes():
        path, method = route.resource.canonical, route.method
        if method == "HEAD":
            continue
        methods = real.get(path, (frozenset(), None))[0]
        if not (method == "*" and methods) and method not in methods:
            raise RuntimeError(f"stand-in route {method} {path} does not exist in sglang {sglang_source.SGLANG_VERSION} "
                               f"(it serves {sorted(methods) or 'no such path'})")


class StandinServer(GenerationMixin, WeightsMixin):
    """The server state and routes. `start()` runs it on a background thread (in-process use)."""

    def __init__(
        self,
        model_path: Optional[str] = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tp_size: int = 1,
        api_key: Optional[str] = None,
        enable_memory_saver: bool = False,
        zero_latency: bool = False,
        token_delay_s: float = 0.0,
        startup_delay_s: float = 0.0,
        weight_session: bool = True,
        max_running: int = 256,
        response_delay_s: float = 0.0,
        readback_any_model: bool = False,
        version: str = "0.5.23",
    ) -> None:
        """readback_any_model: serve /get_weights_by_name for every model (test inspection of what landed);
        by default only for the model classes sglang 0.5.23 implements it for (400 otherwise, as there)."""
        self.host, self.port, self.tp_size, self.api_key = host, port, tp_size, api_key
        self.enable_memory_saver, self.zero_latency = enable_memory_saver, zero_latency
        self.token_delay_s, self.weight_session, self.max_running = token_delay_s, weight_session, max_running
        self.ready_at = time.monotonic() + startup_delay_s
        self.response_delay_s = response_delay_s
        self.readback_any_model = readback_any_model
        self.version = version  # /server_info; below 0.5.23 flattened buckets must hold one dtype
        self.model_path = model_path
        self.model = None
        if not zero_latency:
            import transformers

            if model_path is None:
                raise ValueError("--model-path is required unless --zero-latency")
            self.model = transformers.AutoModelForCausalLM.from_pretrained(model_path).float().eval()
            eos = self.model.config.eos_token_id
            self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            self.vocab_size = int(self.model.config.vocab_size)
        self.weight_version = "default"
        self.waiting: list = []
        self.running: list = []
        self.paused_mode: Optional[str] = None
        self.released: set[str] = set()
        self.session_open = False
        self.groups: dict[str, Any] = {}
        self.requests_seen: list[tuple[str, str, Any]] = []
        # (event, memory tags released at that moment): release / resume / /generate / load_weights
        self.memory_events: list[tuple[str, tuple]] = []
        self.memory_event_times: list[float] = []  # time.time() of each memory event (the trainer logs the same clock)
        self._init_generation()
        self._wakeup: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None
        self._scheduler_task: Optional[asyncio.Task] = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ---- app -------------------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth], client_max_size=1 << 30)
        post = {
            "/generate": self.generate, "/abort_request": self.abort_request,
            "/pause_generation": self.pause_generation, "/continue_generation": self.continue_generation,
            "/release_memory_occupation": self.release_memory, "/resume_memory_occupation": self.resume_memory,
            "/update_weights_from_tensor": self.update_from_tensor, "/update_weights_from_disk": self.update_from_disk,
            "/init_weights_update_group": self.init_group, "/destroy_weights_update_group": self.destroy_group,
            "/update_weights_from_distributed": self.update_from_distributed,
        }
        if self.weight_session:
            post.update({"/begin_weight_update": self.begin_weight_update, "/end_weight_update": self.end_weight_update})
        for path, handler in post.items():
            app.router.add_post(path, handler)
        for path in ("/flush_cache", "/get_weights_by_name"):
            app.router.add_route("*", path, {"/flush_cache": self.flush_cache, "/get_weights_by_name": self.get_weights}[path])
        for path in ("/health", "/health_generate"):
            app.router.add_get(path, self.health)
        app.router.add_get("/model_info", self.model_info)
        app.router.add_get("/server_info", self.server_info)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        check_routes_exist(app)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key and not request.path.startswith("/health"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        await self._record(request)
        try:
            return await handler(request)
        except BadRequest as exc:
            return error_response(400, str(exc))

    async def _record(self, request: web.Request) -> None:
        """Appends (method, path, parsed JSON body or None) to `requests_seen` (tests judge what was sent)."""
        raw = await request.read()  # aiohttp caches the body: the handler reads it again
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        self.requests_seen.append((request.method, request.path, body))

    async def _on_startup(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        if self.model is not None:
            self._scheduler_task = asyncio.ensure_future(self._scheduler())

    async def _on_cleanup(self, app: web.Application) -> None:
        """Cancels the scheduler and waits for it to end (a task left pending when its loop goes away
        is reported as "Task was destroyed but it is pending!"); requests still queued are aborted."""
        task, self._scheduler_task = self._scheduler_task, None
        if task is None:
            return
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        self._abort_all("server shut down")

    @staticmethod
    async def _json(request: web.Request, implemented: Optional[set] = None, struct: str = "") -> dict:
        """The JSON body; with `implemented`, checked against sglang's io_struct `struct` (from its source)
        and against the fields the stand-in implements."""
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise BadRequest(f"{struct or request.path}: body is not JSON: {exc}") from None
        if implemented is not None:
            check_fields(body, frozenset(implemented), struct, struct=struct)
        return body

    # ---- health / info ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if time.monotonic() < self.ready_at else 200)

    async def server_info(self, request: web.Request) -> web.Response:
        return web.json_response({"version": self.version, "tp_size": self.tp_size, "frontend": "python"})

    async def model_info(self, request: web.Request) -> web.Response:
        """`/model_info` (0.5.23 has no `/get_weight_version`; `/get_model_info` is deprecated there)."""
        return web.json_response({"model_path": self.model_path or "standin", "is_generation": True,
                                  "weight_version": self.weight_version})


    async def pause_generation(self, request: web.Request) -> web.Response:
        body = await self._json(request, {"mode"}, "PauseGenerationReqInput")
        mode = body.get("mode", "abort")
        if mode not in ("abort", "retract", "in_place"):
            raise BadRequest(f"PauseGenerationReqInput.mode: {mode!r} not in abort/retract/in_place")
        if mode == "abort":
            self._abort_all("Abort by pause_generation")
        elif mode == "retract":
            self.waiting = self.running + self.waiting
            self.running = []
        self.paused_mode = mode
        return web.json_response({"message": "Generation paused successfully.", "status": "ok"})

    async def continue_generation(self, request: web.Request) -> web.Response:
        await self._json(request, {"torch_empty_cache"}, "ContinueGenerationReqInput")
        self.paused_mode = None
        self._wakeup.set()
        return web.json_response({"message": "Generation continued successfully.", "status": "ok"})

    async def flush_cache(self, request: web.Request) -> web.Response:
        if self.running or self.waiting:
            return web.Response(status=400, text="Cache not flushed: there are running or waiting requests.\n")
        return web.Response(status=200, text="Cache flushed.\n")

    # ---- memory ----------------------------------------------------------------------------------
    async def _memory_tags(self, request: web.Request, what: str) -> set:
        body = await self._json(request, {"tags"}, what)
        if not self.enable_memory_saver:
            raise BadRequest(f"{what}: needs --enable-memory-saver")
        if self.running or self.waiting:
            raise BadRequest(f"{what}: the server is not idle")
        tags = set(body.get("tags") or MEMORY_TAGS)
        if tags - set(MEMORY_TAGS):
            raise BadRequest(f"{what}.tags: {sorted(tags - set(MEMORY_TAGS))} not in {list(MEMORY_TAGS)}")
        return tags

    def record_memory_event(self, event: str) -> None:
        self.memory_events.append((event, tuple(sorted(self.released))))
        self.memory_event_times.append(time.time())

    async def release_memory(self, request: web.Request) -> web.Response:
        self.released |= await self._memory_tags(request, "ReleaseMemoryOccupationReqInput")
        self.record_memory_event("release")
        return web.Response(status=200)

    async def resume_memory(self, request: web.Request) -> web.Response:
        self.released -= await self._memory_tags(request, "ResumeMemoryOccupationReqInput")
        self.record_memory_event("resume")
        self._wakeup.set()
        return web.Response(status=200)

    # ---- running ---------------------------------------------------------------------------------
    def start(self) -> StandinServer:
        """Serves on a background thread; returns once the port is bound."""
        started = threading.Event()

        def run() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._runner = web.AppRunner(self.make_app(), access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, self.host, self.port)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, daemon=True, name=f"standin-{self.port}")
        self._thread.start()
        if not started.wait(60):
            raise RuntimeError("stand-in did not start")
        return self

    def call(self, fn, *args):
        """Runs fn(*args) on the server's loop (tests poke state safely) and returns its result."""
        async def wrapped():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(wrapped(), self._loop).result(30)

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()
        self._loop = None


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="SGLang 0.5.23 stand-in server (CPU tests)")
    parser.add_argument("--model-path", "--model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--tp-size", "--tp", type=int, default=1)
    parser.add_argument("--dp-size", "--dp", type=int, default=1)
    parser.add_argument("--mem-fraction-static", type=float)
    parser.add_argument("--enable-memory-saver", action="store_true")
    parser.add_argument("--quantization")
    parser.add_argument("--enable-deterministic-inference", action="store_true")
    parser.add_argument("--api-key")
    parser.add_argument("--nccl-port", type=int)
    parser.add_argument("--base-gpu-id", type=int)
    parser.add_argument("--skip-tokenizer-init", action="store_true")
    parser.add_argument("--log-level")
    # stand-in only
    parser.add_argument("--zero-latency", action="store_true")
    parser.add_argument("--token-delay-s", type=float, default=0.0)
    parser.add_argument("--response-delay-s", type=float, default=0.0, help="zero-latency mode: answer after this sleep")
    parser.add_argument("--startup-delay-s", type=float, default=0.0)
    parser.add_argument("--no-weight-session", action="store_true")
    parser.add_argument("--readback-any-model", action="store_true", help="/get_weights_by_name for every model")
    parser.add_argument("--fail-startup", help="print this message and exit 1 (tests the launcher)")
    args = parser.parse_args(argv)
    print(f"[standin] launching with {vars(args)}", flush=True)
    if args.fail_startup:
        print(f"[standin] fatal: {args.fail_startup}", flush=True)
        sys.exit(1)
    server = StandinServer(
        args.model_path, host=args.host, port=args.port, tp_size=args.tp_size, api_key=args.api_key,
        enable_memory_saver=args.enable_memory_saver, zero_latency=args.zero_latency,
        token_delay_s=args.token_delay_s, startup_delay_s=args.startup_delay_s, response_delay_s=args.response_delay_s,
        weight_session=not args.no_weight_session, readback_any_model=args.readback_any_model,
    )
    print(f"[standin] serving on {server.url}", flush=True)
    web.run_app(server.make_app(), host=args.host, port=args.port, access_log=None, print=None)
