"""`/generate` and `/abort_request` of the stand-in: a tiny `transformers` model with continuous
batching (every running request advances one token per step), or, in zero-latency mode, fixed
tokens answered at once from precomputed JSON pieces (the benchmark measures the client, not this).

Each batch item is its own request in the scheduler and answers on its own: an abort ends every item
with finish_reason abort and its partial output, exactly as SGLang's per-item results do.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from typing import Optional

from aiohttp import web

from tests.helpers.sglang_standin.schema import BadRequest, normalize_generate

FIXED_TOKENS = 8  # zero-latency answers: min(max_new_tokens, 8) fixed tokens, logprob -1 each


class _Request:
    def __init__(self, prompt: list[int], params: dict, return_logprob: bool, rid: Optional[str],
                 future: asyncio.Future) -> None:
        import torch

        self.rid = rid or uuid.uuid4().hex
        self.prompt = prompt
        self.params = params
        self.return_logprob = return_logprob
        self.future = future
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.generator = torch.Generator()
        seed = params.get("sampling_seed")
        self.generator.manual_seed(int(seed) if seed is not None else int.from_bytes(uuid.uuid4().bytes[:7], "little"))
        self.started = time.monotonic()


class GenerationMixin:
    """Needs from the server: model, eos_ids, vocab_size, zero_latency, response_delay_s, token_delay_s,
    max_running, paused_mode, released, weight_version, waiting, running, _wakeup, generate_count."""

    # ---- HTTP ------------------------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.Response:
        self.generate_count += 1  # every /generate call, accepted or not
        body = await self._json(request)
        single, jobs = normalize_generate(body)
        self.record_memory_event("/generate")
        if self.released & {"weights", "kv_cache"}:  # a real server would read unmapped memory
            raise BadRequest(f"generate: memory released ({sorted(self.released)}); resume it first")
        self.generate_items += len(jobs)
        if self.zero_latency:
            if self.response_delay_s:
                self.items_in_flight += len(jobs)
                self.max_items_in_flight = max(self.max_items_in_flight, self.items_in_flight)
                try:
                    await asyncio.sleep(self.response_delay_s)  # models server time without using CPU
                finally:
                    self.items_in_flight -= len(jobs)
            pieces = [self._fixed_output(prompt, params, logprob, rid) for prompt, params, logprob, rid in jobs]
            raw = pieces[0] if single else b"[" + b",".join(pieces) + b"]"
            return web.Response(body=raw, content_type="application/json")
        for prompt, *_ in jobs:
            if not all(0 <= t < self.vocab_size for t in prompt):
                raise BadRequest(f"input_ids: token id out of range [0, {self.vocab_size})")
        loop = asyncio.get_running_loop()
        requests = [_Request(list(p), params, logprob, rid, loop.create_future()) for p, params, logprob, rid in jobs]
        self.waiting.extend(requests)
        self._wakeup.set()
        outs = list(await asyncio.gather(*(r.future for r in requests)))
        return web.json_response(outs[0] if single else outs)

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

    # ---- responses -------------------------------------------------------------------------------
    def _response(self, prompt: list[int], tokens: list[int], logprobs: list[float], finish: dict, rid: str,
                  return_logprob: bool = True) -> dict:
        meta = {
            "id": rid,
            "finish_reason": finish,
            "prompt_tokens": len(prompt),
            "completion_tokens": len(tokens),
            "cached_tokens": 0,
            "weight_version": self.weight_version,
        }
        if return_logprob:
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(logprobs, tokens, strict=True)]
        return {"text": "", "output_ids": tokens, "meta_info": meta}

    def _fixed_output(self, prompt: list[int], params: dict, return_logprob: bool, rid: Optional[str]) -> bytes:
        """The JSON of one zero-latency result. Everything but id and prompt_tokens is the same for a
        given (length, return_logprob, weight_version), so it is built once and spliced."""
        length = min(int(params["max_new_tokens"]), FIXED_TOKENS)
        key = (length, return_logprob, self.weight_version)
        pieces = self._fixed_pieces.get(key)
        if pieces is None:
            tokens = [(7 * i + 1) % 50 for i in range(length)]
            response = self._response([], tokens, [-1.0] * length, {"type": "length", "length": length}, "@@ID@@",
                                      return_logprob)
            response["meta_info"]["prompt_tokens"] = -987654321
            head, rest = json.dumps(response).split('"@@ID@@"', 1)
            middle, tail = rest.split("-987654321", 1)
            pieces = (head.encode() + b'"', b'"' + middle.encode(), tail.encode())
            self._fixed_pieces[key] = pieces
        item_id = json.dumps(rid)[1:-1] if rid is not None else f"{self._id_prefix}{next(self._id_counter)}"
        return b"".join((pieces[0], item_id.encode(), pieces[1], str(len(prompt)).encode(), pieces[2]))

    def _init_generation(self) -> None:
        self.generate_count = 0
        self.generate_items = 0  # results answered (batch items, n expanded)
        self.items_in_flight = self.max_items_in_flight = 0  # zero-latency mode with a response delay
        self._fixed_pieces: dict = {}
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count()

    def _finish(self, req: _Request, finish: dict) -> None:
        if not req.future.done():
            req.future.set_result(self._response(req.prompt, req.tokens, req.logprobs, finish, req.rid, req.return_logprob))

    def _abort_all(self, message: str) -> None:
        for req in self.waiting + self.running:
            self._finish(req, {"type": "abort", "message": message})
        self.waiting, self.running = [], []

    # ---- scheduler -------------------------------------------------------------------------------
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
        # One forward per request, not one padded forward over all of them: a padded batch's width
        # (and so its float rounding) depends on which requests happen to run together, and the
        # tests compare a sample generated alone, in a batch and one request per sample bit for bit.
        still = []
        for req in self.running:
            p = req.params
            ids = torch.tensor([req.prompt + req.tokens])
            logits = self.model(input_ids=ids).logits[0, -1, :].float()
            logp = torch.log_softmax(logits / p["temperature"], dim=-1)
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
