"""The `/generate` request schema of sglang 0.5.23, validated as strictly as the server does.

Facts (sglang python/sglang/srt/managers/io_struct.py, `GenerateReqInput.normalize_batch_and_arguments`):
- `input_ids` is one prompt (list of int) or a batch (list of lists); empty is an error.
- `sampling_params` is one dict shared by every item, or a list with one dict per item; with a list
  every item must carry the same `n` ("The parallel_sample_num should be the same ...").
- `rid` is a string (a batch expands it to "<rid>_<i>") or a list whose length must equal the batch
  size; rids must be unique.
- `return_logprob` / `logprob_start_len` / `top_logprobs_num` are one value or a per-item list; a
  list together with n > 1 is an error ("Cannot use list return_logprob with parallel_sample_num > 1").
- n > 1 on a single prompt turns it into a batch; a batch of B prompts with n > 1 answers B * n
  results, prompt-major (every sample of prompt 0, then prompt 1, ...).
A malformed request is a ValueError there, which the HTTP server answers with 400. SGLang does not
check the length of a `sampling_params` list itself (a short list fails later, a long one is cut);
the stand-in refuses both with 400, so a client that passes here is right on the real server.
"""
from __future__ import annotations

from typing import Any

# GenerateReqInput fields of sglang 0.5.23 (srt/managers/io_struct.py). Unknown -> 400.
GENERATE_FIELDS = frozenset({
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
})
GENERATE_IMPLEMENTED = frozenset({"rid", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                                  "stream", "log_metrics", "return_text_in_logprobs", "top_logprobs_num"})
# SamplingParams API fields of sglang 0.5.23 (srt/sampling/sampling_params.py). Unknown -> 400.
SAMPLING_FIELDS = frozenset({
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema", "regex",
    "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim",
    "custom_params", "stream_interval", "logit_bias", "sampling_seed",
})
SAMPLING_IMPLEMENTED = frozenset({"max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "n",
                                  "ignore_eos", "sampling_seed", "skip_special_tokens",
                                  "spaces_between_special_tokens", "no_stop_trim"})
SAMPLING_DEFAULTS = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1,
                     "ignore_eos": False, "stop_token_ids": None, "sampling_seed": None}
_EMPTY = (None, False, [], {})


class BadRequest(Exception):
    """Answered with HTTP 400 and this message."""


def check_fields(body: Any, allowed: frozenset, implemented: frozenset, what: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object")
    extra = body.keys() - allowed
    if extra:
        raise BadRequest(f"{what}: unexpected field(s) {sorted(extra)} (extra_forbidden)")
    unimplemented = sorted(k for k in body.keys() - implemented if body[k] not in _EMPTY)
    if unimplemented:
        raise BadRequest(f"{what}: field(s) {unimplemented} are valid SGLang but not implemented by the stand-in")


def verify_sampling(sampling: Any, what: str = "SamplingParams") -> dict:
    """One sampling_params dict -> the full parameter dict; SGLang's `SamplingParams.verify` errors as 400."""
    if sampling is None:
        sampling = {}
    check_fields(sampling, SAMPLING_FIELDS, SAMPLING_IMPLEMENTED, what)
    params = dict(SAMPLING_DEFAULTS)
    for key, value in sampling.items():
        if value is not None:
            params[key] = value
    if params["temperature"] < 0:
        raise BadRequest(f"{what}: temperature must be a non-negative finite number, got {params['temperature']}.")
    if not 0.0 < params["top_p"] <= 1.0:
        raise BadRequest(f"{what}: top_p must be in (0, 1], got {params['top_p']}.")
    if params["top_k"] < 1 and params["top_k"] != -1:
        raise BadRequest(f"{what}: top_k must be -1 (disable) or at least 1, got {params['top_k']}.")
    if params["max_new_tokens"] < 0:
        raise BadRequest(f"{what}: max_new_tokens must be at least 0, got {params['max_new_tokens']}.")
    if not isinstance(params["n"], int) or params["n"] < 1:
        raise BadRequest(f"{what}: n must be a positive integer, got {params['n']!r}.")
    if params["temperature"] < 1e-6:  # sglang: greedy is top_k = 1
        params["temperature"], params["top_k"] = 1.0, 1
    return params


def _per_item(value: Any, default: Any, batch_size: int, n: int, name: str) -> list:
    """A scalar-or-list logprob argument -> one value per prompt (before the n expansion)."""
    if value is None:
        return [default] * batch_size
    if not isinstance(value, list):
        return [value] * batch_size
    if n > 1:
        raise BadRequest(f"Cannot use list {name} with parallel_sample_num > 1")
    if len(value) != batch_size:
        raise BadRequest(f"The length of {name} ({len(value)}) should be equal to the batch size ({batch_size}).")
    return value


def normalize_generate(body: Any) -> tuple[bool, list[tuple[list, dict, bool, str | None]]]:
    """A `/generate` body -> (is_single, jobs): one (input_ids, params, return_logprob, rid) per result,
    in the order SGLang answers them. Raises BadRequest for what SGLang refuses."""
    check_fields(body, GENERATE_FIELDS, GENERATE_IMPLEMENTED, "GenerateReqInput")
    if body.get("stream"):
        raise BadRequest("GenerateReqInput: stream=true is not implemented by the stand-in")
    input_ids = body.get("input_ids")
    if input_ids is None:
        raise BadRequest("Either text, input_ids or input_embeds should be provided.")
    if not isinstance(input_ids, list) or not input_ids:
        raise BadRequest("input_ids cannot be empty.")
    single = isinstance(input_ids[0], int)
    prompts = [input_ids] if single else input_ids
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, list) or not prompt or not all(type(t) is int for t in prompt):
            raise BadRequest(f"input_ids[{i}]: expected a non-empty list of int (a batch is a list of lists)")
    batch_size = len(prompts)
    sampling = body.get("sampling_params")
    if isinstance(sampling, list):
        if single:
            raise BadRequest("sampling_params: a list needs a batch of input_ids (a list of lists)")
        if len(sampling) != batch_size:
            raise BadRequest(f"sampling_params: {len(sampling)} items for a batch of {batch_size} inputs")
        params = [verify_sampling(s, f"SamplingParams[{i}]") for i, s in enumerate(sampling)]
        if len({p["n"] for p in params}) > 1:
            raise BadRequest("The parallel_sample_num should be the same for all samples in sample params.")
    elif sampling is None or isinstance(sampling, dict):
        params = [verify_sampling(sampling)] * batch_size
    else:
        raise BadRequest("sampling_params: expected an object or a list of objects")
    n = params[0]["n"]
    rid = body.get("rid")
    if rid is None or (single and n == 1):
        rids = [rid] * batch_size
    elif isinstance(rid, str):
        rids = [f"{rid}_{i}" for i in range(batch_size)]
    elif isinstance(rid, list):
        if len(rid) != batch_size:
            raise BadRequest("The specified rids length mismatch with the batch_size for batch processing.")
        if len(set(rid)) != len(rid):
            raise BadRequest(f"Duplicate request IDs detected within the request: {rid}")
        rids = rid
    else:
        raise BadRequest("The rid should be a string or a list of strings.")
    logprob = _per_item(body.get("return_logprob"), False, batch_size, n, "return_logprob")
    _per_item(body.get("logprob_start_len"), -1, batch_size, n, "logprob_start_len")
    _per_item(body.get("top_logprobs_num"), 0, batch_size, n, "top_logprobs_num")
    if n > 1:
        single = False
        # n samples of one prompt get fresh rids on the server (regenerate_rid)
        return single, [(prompts[i], params[i], bool(logprob[i]), None) for i in range(batch_size) for _ in range(n)]
    return single, [(prompts[i], params[i], bool(logprob[i]), rids[i]) for i in range(batch_size)]
