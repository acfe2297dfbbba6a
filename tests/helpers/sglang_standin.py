"""A protocol-faithful stand-in for an SGLang 0.5.23 server (aiohttp), for CPU tests.

It really generates with a tiny `transformers` model (continuous batching: one batched forward per
step over every running request), and is strict where the real server is:
- 400 on unknown `/generate` fields or sampling params (and on known ones it does not implement);
- `output_token_logprobs` as (logprob, token_id, text) triples, `finish_reason` objects;
- `/flush_cache` refused (400) while requests are waiting or running;
- `/update_weights_from_tensor|distributed` refused outside `/begin_weight_update` ...
  `/end_weight_update` (`--no-weight-session` emulates servers older than 0.5.23: 404 there);
- `--api-key`: every path but /health* needs `Authorization: Bearer <key>` (else 401);
- memory release/resume need `--enable-memory-saver` and an idle server.
Weight payloads: `update_weights_from_tensor` takes one base64 pickle per TP rank holding a list of
(name, tensor) or, with load_format "flattened_bucket", {"flattened_tensor": uint8[N], "metadata":
[{name, shape, dtype, start_idx, end_idx, numel}]} (byte offsets); `init_weights_update_group` joins a
gloo group exactly as SGLang's `init_custom_process_group` does (tcp:// rendezvous as rank
`rank_offset + tp_rank`, PrefixStore(group_name), torch's `_new_process_group_helper`, which adds its
own "<group_name>/" and "<device>/" key prefixes), so a trainer that meets the stand-in meets real
SGLang; `update_weights_from_distributed` then receives each tensor by broadcast from rank 0 in
`names` order; `/destroy_weights_update_group` calls `destroy_process_group` on it, as SGLang does.

Zero-latency mode (`--zero-latency`): no model; `/generate` answers at once with fixed tokens.
Use in-process (`StandinServer(...).start()`) or as a subprocess: `python tests/helpers/sglang_standin.py
--model-path DIR --port P` (accepts the `sglang.launch_server` flags the launcher passes).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import datetime
import io
import json
import pickle
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

# GenerateReqInput fields of sglang 0.5.23 (srt/managers/io_struct.py). Unknown -> 400.
GENERATE_FIELDS = {
    "rid", "session_id", "text", "input_ids", "input_embeds", "image_data", "video_data", "audio_data", "mm_hashes",
    "mm_content_hashes", "use_audio_in_video", "video_config", "sampling_params", "return_logprob",
    "logprob_start_len", "top_logprobs_num", "token_ids_logprob", "return_sampling_mask", "return_text_in_logprobs",
    "return_flat_raw_top_logprobs", "return_flat_raw_top_logprobs_b64", "stream", "log_metrics",
    "return_hidden_states", "return_routed_experts", "routed_experts_start_len", "return_indexer_topk", "modalities",
    "session_params", "lora_path", "lora_id", "custom_logit_processor", "positional_embed_overrides",
    "bootstrap_host", "bootstrap_port", "bootstrap_room", "bootstrap_pair_key", "decode_tp_size", "routed_dp_rank",
    "data_parallel_rank", "disagg_prefill_dp_rank", "kv_router_hint", "routing_key", "conversation_id",
    "http_worker_ipc", "background", "require_reasoning", "max_thinking_tokens", "priority", "extra_key", "no_logs",
    "custom_labels", "return_bytes", "return_entropy", "return_prompt_token_ids", "external_trace_header",
    "received_time", "need_wait_for_mm_inputs", "num_items_assigned", "encoder_urls", "max_dynamic_patch",
    "min_dynamic_patch", "image_max_dynamic_patch", "video_max_dynamic_patch", "images_config",
    "multi_item_delimiter_indices", "cache_salt",
}
GENERATE_IMPLEMENTED = {"rid", "input_ids", "sampling_params", "return_logprob", "logprob_start_len", "stream",
                        "log_metrics", "return_text_in_logprobs", "top_logprobs_num"}
# SamplingParams API fields of sglang 0.5.23 (srt/sampling/sampling_params.py). Unknown -> 400.
SAMPLING_FIELDS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}
SAMPLING_IMPLEMENTED = {"max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "n", "ignore_eos",
                        "sampling_seed", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim"}
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")


class BadRequest(Exception):
    pass


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": "BadRequest", "code": status}, status=status)


def _check_fields(body: Any, allowed: set, implemented: set, what: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"{what}: unexpected field(s) {unknown} (extra_forbidden)")
    unimplemented = sorted(k for k in set(body) - implemented if body[k] not in (None, False, [], {}))
    if unimplemented:
        raise BadRequest(f"{what}: field(s) {unimplemented} are valid SGLang but not implemented by the stand-in")


class _Request:
    def __init__(self, prompt: list[int], params: dict, future: asyncio.Future) -> None:
        self.rid = uuid.uuid4().hex
        self.prompt = prompt
        self.params = params
        self.future = future
        import torch

        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.generator = torch.Generator()
        seed = params.get("sampling_seed")
        self.generator.manual_seed(int(seed) if seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little"))
        self.started = time.monotonic()


class StandinServer:
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
    ) -> None:
        self.host, self.port, self.tp_size, self.api_key = host, port, tp_size, api_key
        self.enable_memory_saver, self.zero_latency = enable_memory_saver, zero_latency
        self.token_delay_s, self.weight_session, self.max_running = token_delay_s, weight_session, max_running
        self.ready_at = time.monotonic() + startup_delay_s
        self.response_delay_s = response_delay_s
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
        self.waiting: list[_Request] = []
        self.running: list[_Request] = []
        self.paused_mode: Optional[str] = None
        self.released: set[str] = set()
        self.session_open = False
        self.groups: dict[str, Any] = {}
        self.generate_count = 0
        self._wakeup: Optional[asyncio.Event] = None
        self._thread: Optional[threading.Thread] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._runner: Optional[web.AppRunner] = None

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
        app.router.add_get("/get_model_info", self.model_info)
        app.router.add_get("/get_weight_version", self.get_weight_version)
        app.on_startup.append(self._on_startup)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key and not request.path.startswith("/health"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                return web.json_response({"error": "Unauthorized"}, status=401)
        try:
            return await handler(request)
        except BadRequest as exc:
            return _error(400, str(exc))

    async def _on_startup(self, app: web.Application) -> None:
        self._wakeup = asyncio.Event()
        if self.model is not None:
            self._scheduler_task = asyncio.ensure_future(self._scheduler())

    @staticmethod
    async def _json(request: web.Request, allowed: Optional[set] = None, what: str = "") -> dict:
        text = await request.text()
        try:
            body = json.loads(text) if text else {}
        except ValueError as exc:
            raise BadRequest(f"{what or request.path}: body is not JSON: {exc}") from None
        if allowed is not None:
            _check_fields(body, allowed, allowed, what or request.path)
        return body

    # ---- health / info ---------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if time.monotonic() < self.ready_at else 200)

    async def model_info(self, request: web.Request) -> web.Response:
        return web.json_response({"model_path": "standin", "is_generation": True, "weight_version": self.weight_version})

    async def get_weight_version(self, request: web.Request) -> web.Response:
        return web.json_response({"weight_version": self.weight_version})

    # ---- generation ------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.Response:
        self.generate_count += 1  # every /generate call, accepted or not
        body = await self._json(request)
        _check_fields(body, GENERATE_FIELDS, GENERATE_IMPLEMENTED, "GenerateReqInput")
        if body.get("stream"):
            raise BadRequest("GenerateReqInput: stream=true is not implemented by the stand-in")
        input_ids = body.get("input_ids")
        if not input_ids:
            raise BadRequest("Either text, input_ids or input_embeds should be provided.")
        single = isinstance(input_ids[0], int)
        prompts = [input_ids] if single else input_ids
        sampling = body.get("sampling_params") or {}
        if not isinstance(sampling, dict):
            raise BadRequest("sampling_params: only one dict for all inputs is implemented by the stand-in")
        _check_fields(sampling, SAMPLING_FIELDS, SAMPLING_IMPLEMENTED, "SamplingParams")
        params = self._verify_sampling(sampling)
        n = params["n"]
        if n > 1:
            single = False
        jobs = [p for p in prompts for _ in range(n)]
        if self.zero_latency:
            if self.response_delay_s:
                await asyncio.sleep(self.response_delay_s)  # models server time without using CPU
            outs = [self._fixed_output(p, params) for p in jobs]
        else:
            for prompt in jobs:
                if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
                    raise BadRequest(f"input_ids: token id out of range [0, {self.vocab_size})")
            loop = asyncio.get_running_loop()
            requests = [_Request(list(p), params, loop.create_future()) for p in jobs]
            self.waiting.extend(requests)
            self._wakeup.set()
            outs = list(await asyncio.gather(*(r.future for r in requests)))
        return web.json_response(outs[0] if single else outs)

    @staticmethod
    def _verify_sampling(sampling: dict) -> dict:
        params = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1, "ignore_eos": False,
                  "stop_token_ids": None, "sampling_seed": None}
        params.update({k: v for k, v in sampling.items() if v is not None})
        if params["temperature"] < 0:
            raise BadRequest(f"temperature must be a non-negative finite number, got {params['temperature']}.")
        if not 0.0 < params["top_p"] <= 1.0:
            raise BadRequest(f"top_p must be in (0, 1], got {params['top_p']}.")
        if params["top_k"] < 1 and params["top_k"] != -1:
            raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {params['top_k']}.")
        if params["max_new_tokens"] < 0:
            raise BadRequest(f"max_new_tokens must be at least 0, got {params['max_new_tokens']}.")
        if params["temperature"] < 1e-6:  # sglang: greedy is top_k = 1
            params["temperature"], params["top_k"] = 1.0, 1
        return params

    def _fixed_output(self, prompt: list[int], params: dict) -> dict:
        length = min(int(params["max_new_tokens"]), 8)
        tokens = [(7 * i + 1) % 50 for i in range(length)]
        return self._response(prompt, tokens, [-1.0] * length, {"type": "length", "length": length})

    def _response(self, prompt: list[int], tokens: list[int], logprobs: list[float], finish: dict, rid: str = "") -> dict:
        return {
            "text": "",
            "output_ids": tokens,
            "meta_info": {
                "id": rid or uuid.uuid4().hex,
                "finish_reason": finish,
                "prompt_tokens": len(prompt),
                "completion_tokens": len(tokens),
                "cached_tokens": 0,
                "weight_version": self.weight_version,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)],
            },
        }

    def _finish(self, req: _Request, finish: dict) -> None:
        if not req.future.done():
            req.future.set_result(self._response(req.prompt, req.tokens, req.logprobs, finish, req.rid))

    def _abort_all(self, message: str) -> None:
        for req in self.waiting + self.running:
            self._finish(req, {"type": "abort", "message": message})
        self.waiting, self.running = [], []

    async def _scheduler(self) -> None:
        while True:
            can_run = self.paused_mode is None and not self.released
            if not can_run or not (self.waiting or self.running):
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            while self.waiting and len(self.running) < self.max_running:
                self.running.append(self.waiting.pop(0))
            self._step()
            await asyncio.sleep(self.token_delay_s)

    def _step(self) -> None:
        """One decode step for every running request (full-sequence forward: no KV cache needed)."""
        import torch

        with torch.inference_mode():
            self._decode(torch)

    def _decode(self, torch) -> None:
        seqs = [r.prompt + r.tokens for r in self.running]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq):] = torch.tensor(seq)
            mask[row, width - len(seq):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1, :].float()
        still = []
        for row, req in enumerate(self.running):
            p = req.params
            logp = torch.log_softmax(logits[row] / p["temperature"], dim=-1)
            probs = logp.exp()
            if p["top_k"] != -1 and p["top_k"] < probs.numel():
                threshold = torch.topk(probs, p["top_k"]).values[-1]
                probs = torch.where(probs >= threshold, probs, torch.zeros_like(probs))
            if p["top_p"] < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                drop = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= p["top_p"] * probs.sum()
                probs = probs.scatter(0, order[drop], 0.0)
            token = int(torch.multinomial(probs, 1, generator=req.generator))
            req.tokens.append(token)
            req.logprobs.append(float(logp[token]))
            stops = set(p["stop_token_ids"] or []) | (set() if p["ignore_eos"] else self.eos_ids)
            if token in stops:
                self._finish(req, {"type": "stop", "matched": token})
            elif len(req.tokens) >= p["max_new_tokens"]:
                self._finish(req, {"type": "length", "length": p["max_new_tokens"]})
            else:
                still.append(req)
        self.running = still

    async def abort_request(self, request: web.Request) -> web.Response:
        body = await self._json(request, {"rid", "abort_all", "finished_reason", "abort_message"}, "AbortReq")
        if body.get("abort_all"):
            self._abort_all("Abort all requests")
        elif body.get("rid"):
            for req in [r for r in self.waiting + self.running if r.rid == body["rid"]]:
                self._finish(req, {"type": "abort", "message": "Abort request"})
            self.waiting = [r for r in self.waiting if not r.future.done()]
            self.running = [r for r in self.running if not r.future.done()]
        return web.Response(status=200)

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

    async def release_memory(self, request: web.Request) -> web.Response:
        self.released |= await self._memory_tags(request, "ReleaseMemoryOccupationReqInput")
        return web.Response(status=200)

    async def resume_memory(self, request: web.Request) -> web.Response:
        self.released -= await self._memory_tags(request, "ResumeMemoryOccupationReqInput")
        self._wakeup.set()
        return web.Response(status=200)

    # ---- weights ---------------------------------------------------------------------------------
    async def begin_weight_update(self, request: web.Request) -> web.Response:
        await self._json(request, {"selector"}, "BeginWeightUpdateReqInput")
        if self.session_open:
            raise BadRequest("begin_weight_update: a weight update session is already open")
        self.session_open = True
        return web.json_response({"success": True, "message": "Weight update session opened."})

    async def end_weight_update(self, request: web.Request) -> web.Response:
        await self._json(request, {"run_post_load"}, "EndWeightUpdateReqInput")
        if not self.session_open:
            raise BadRequest("end_weight_update: no weight update session is open")
        self.session_open = False
        return web.json_response({"success": True, "message": "Weight update session closed."})

    def _require_session(self, what: str) -> None:
        if self.weight_session and not self.session_open:
            raise BadRequest(f"{what}: weight updates must be wrapped in /begin_weight_update ... /end_weight_update")

    def _load(self, named: list, body: dict) -> web.Response:
        import torch

        params = dict(self.model.state_dict(keep_vars=True))
        for name, tensor in named:
            if name not in params:
                return web.json_response({"success": False, "message": f"unknown parameter {name}"}, status=400)
            if tuple(tensor.shape) != tuple(params[name].shape):
                return web.json_response({"success": False, "message": f"{name}: shape {tuple(tensor.shape)} != {tuple(params[name].shape)}"}, status=400)
        if body.get("abort_all_requests"):
            self._abort_all("Abort for weight update")
        with torch.no_grad():
            for name, tensor in named:
                params[name].copy_(tensor.to(params[name].dtype))
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
        return web.json_response({"success": True, "message": f"Updated {len(named)} tensors."})

    async def update_from_tensor(self, request: web.Request) -> web.Response:
        fields = {"serialized_named_tensors", "load_format", "flush_cache", "abort_all_requests", "weight_version",
                  "disable_draft_model", "torch_empty_cache"}
        body = await self._json(request, fields, "UpdateWeightsFromTensorReqInput")
        self._require_session("update_weights_from_tensor")
        payloads = body.get("serialized_named_tensors")
        if not isinstance(payloads, list) or len(payloads) != self.tp_size:
            raise BadRequest(f"serialized_named_tensors: expected one payload per TP rank ({self.tp_size})")
        decoded = [_decode_payload(p, body.get("load_format")) for p in payloads]
        return self._load(decoded[0], body)

    async def update_from_disk(self, request: web.Request) -> web.Response:
        fields = {"model_path", "load_format", "abort_all_requests", "weight_version", "is_async", "torch_empty_cache",
                  "keep_pause", "recapture_cuda_graph", "token_step", "flush_cache", "manifest"}
        body = await self._json(request, fields, "UpdateWeightFromDiskReqInput")
        from safetensors.torch import load_file

        files = sorted(Path(str(body.get("model_path", ""))).glob("*.safetensors"))
        if not files:
            return web.json_response({"success": False, "message": f"no *.safetensors in {body.get('model_path')}", "num_paused_requests": 0}, status=400)
        named = [item for f in files for item in load_file(str(f)).items()]
        response = self._load(named, body)
        return response

    async def init_group(self, request: web.Request) -> web.Response:
        fields = {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
        body = await self._json(request, fields, "InitWeightsUpdateGroupReqInput")
        if body.get("backend", "nccl") != "gloo":
            raise BadRequest("init_weights_update_group: the CPU stand-in supports backend='gloo' only")
        if self.tp_size != 1:  # real SGLang joins once per TP worker process; the stand-in is one process
            raise BadRequest("init_weights_update_group: the stand-in joins as one TP rank; start it with tp_size=1")
        group_name = body.get("group_name", "weight_update_group")
        if not group_name:
            raise BadRequest("init_weights_update_group: group_name cannot be empty")

        def join():
            return init_custom_process_group(
                backend=body.get("backend", "nccl"), master_address=body["master_address"],
                master_port=int(body["master_port"]), world_size=int(body["world_size"]),
                rank=int(body["rank_offset"]) + 0,  # + tp_rank, which is 0 here
                group_name=group_name, timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))

        try:
            if group_name in self.groups:
                raise ValueError(f"Process group with name {group_name} already exists.")
            group = await asyncio.get_running_loop().run_in_executor(None, join)
        except Exception as exc:  # rendezvous failure is reported, as SGLang does (success false, HTTP 400)
            message = f"Failed to initialize custom process group: {exc}."
            return web.json_response({"success": False, "message": message}, status=400)
        self.groups[group_name] = group
        return web.json_response({"success": True, "message": "Succeeded to initialize custom process group."})

    async def destroy_group(self, request: web.Request) -> web.Response:
        import torch.distributed as dist

        body = await self._json(request, {"group_name"}, "DestroyWeightsUpdateGroupReqInput")
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return web.json_response({"success": False, "message": "The group to be destroyed does not exist."},
                                     status=400)
        dist.destroy_process_group(group)  # frees the group name: the same name can be joined again
        return web.json_response({"success": True, "message": "Succeeded to destroy custom process group."})

    async def update_from_distributed(self, request: web.Request) -> web.Response:
        fields = {"names", "dtypes", "shapes", "group_name", "flush_cache", "abort_all_requests", "weight_version",
                  "load_format", "torch_empty_cache"}
        body = await self._json(request, fields, "UpdateWeightsFromDistributedReqInput")
        self._require_session("update_weights_from_distributed")
        group = self.groups.get(body.get("group_name", "weight_update_group"))
        if group is None:
            raise BadRequest("update_weights_from_distributed: call /init_weights_update_group first")
        import torch

        names, dtypes, shapes = body["names"], body["dtypes"], body["shapes"]
        if not len(names) == len(dtypes) == len(shapes):
            raise BadRequest("names, dtypes, shapes must have the same length")

        def receive():
            out = []
            for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
                tensor = torch.empty(shape, dtype=getattr(torch, str(dtype).replace("torch.", "")))
                group.broadcast(tensor, 0).wait()
                out.append((name, tensor))
            return out

        named = await asyncio.get_running_loop().run_in_executor(None, receive)
        return self._load(named, body)

    async def get_weights(self, request: web.Request) -> web.Response:
        body = await self._json(request, {"name", "truncate_size"}, "GetWeightsByNameReqInput")
        tensor = self.model.state_dict().get(body.get("name"))
        if tensor is None:
            return _error(400, "Get parameter by name failed")
        return web.json_response(tensor.float()[: int(body.get("truncate_size", 100))].tolist())

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
        self._loop = None


GROUP_TIMEOUT_S = 60.0  # SGLang uses torch's default (30 min); bounded here so a broken test fails, not hangs


def init_custom_process_group(*, backend: str, master_address: str, master_port: int, world_size: int, rank: int,
                              group_name: str, timeout: datetime.timedelta):
    """A process group outside the default world, built the way sglang 0.5.23's
    `sglang.srt.utils.init_custom_process_group` builds it (called by the model runner's
    `init_weights_update_group` with init_method tcp://master_address:master_port): rendezvous,
    PrefixStore(group_name), `_new_process_group_helper` (no global ranks: its own world), and the
    identity rank map registered in `_world.pg_group_ranks`."""
    import inspect

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    store, rank, world_size = next(dist.rendezvous(f"tcp://{master_address}:{master_port}", rank, world_size,
                                                   timeout=timeout))
    store.set_timeout(timeout)
    store = dist.PrefixStore(group_name, store)
    # torch 2.6 renamed pg_options to backend_options
    options = "backend_options" if "backend_options" in inspect.signature(c10d._new_process_group_helper).parameters \
        else "pg_options"
    group, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                              group_name=group_name, timeout=timeout, **{options: None})
    c10d._world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


class _AnyObject:
    """Stands in for sglang classes inside pickles (e.g. FlattenedTensorMetadata)."""

    def __init__(self, *args, **kwargs):
        self.__dict__.update(kwargs)

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("sglang"):
            return _AnyObject
        return super().find_class(module, name)


def _field(meta: Any, key: str) -> Any:
    return meta[key] if isinstance(meta, dict) else getattr(meta, key)


def _decode_payload(payload: str, load_format: Optional[str]) -> list:
    import torch

    try:
        obj = _Unpickler(io.BytesIO(base64.b64decode(payload))).load()
    except Exception as exc:
        raise BadRequest(f"serialized_named_tensors: cannot decode payload ({type(exc).__name__}: {exc})") from None
    if load_format == "flattened_bucket":
        flat = obj["flattened_tensor"]
        if flat.dtype != torch.uint8:
            raise BadRequest("flattened_bucket: flattened_tensor must be uint8")
        named = []
        for meta in obj["metadata"]:
            dtype = _field(meta, "dtype")
            dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).replace("torch.", ""))
            chunk = flat[int(_field(meta, "start_idx")):int(_field(meta, "end_idx"))]
            named.append((_field(meta, "name"), chunk.view(dtype).reshape(list(_field(meta, "shape")))))
        return named
    if load_format not in (None, "direct"):
        raise BadRequest(f"load_format: {load_format!r} is not implemented by the stand-in")
    return [(str(name), tensor) for name, tensor in obj]


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
        weight_session=not args.no_weight_session,
    )
    print(f"[standin] serving on {server.url}", flush=True)
    web.run_app(server.make_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
