"""The SGLang 0.5.23 `/generate` schema, in one place: request bodies out, `Sample`s in.

One sample (`samples_per_request` = 1, and always through a router):
    {"input_ids": [int], "sampling_params": {...}, "return_logprob": true}
A batch of k samples (sglang io_struct.py `GenerateReqInput.normalize_batch_and_arguments`):
    {"input_ids": [[int], ...k], "sampling_params": [{...}, ...k], "return_logprob": true}
  one sampling dict per item, so every sample keeps its own `sampling_seed`; no `n` is sent (the
  client expands n itself: n > 1 would make the server draw its own seeds).
Response: one result object, or for a batch a list of k of them in item order:
    {"text": str, "output_ids": [int], "meta_info": {
        "finish_reason": {"type": "stop"|"length"|"abort", ...},
        "output_token_logprobs": [[logprob, token_id, text|null], ...],
        "weight_version": str, "completion_tokens": int, ...}}
Unknown request fields and unknown sampling params are a 400 on the server, so nothing else is sent.
"""
from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence

from maspo_megatron.rollout.types import FINISH_REASONS, RolloutError, Sample, SamplingParams

# HF architectures whose sglang 0.5.23 model class implements `get_weights_by_name` (models/llama.py and
# its subclasses, opt.py, granite.py, exaone4.py, embedding_gemma2.py); for every other class, e.g.
# Qwen2ForCausalLM and Qwen3ForCausalLM, `/get_weights_by_name` answers 400 (tests check this list
# against the source: tests/rollout/test_sglang_contract.py).
WEIGHTS_BY_NAME_ARCHITECTURES = frozenset({
    "LlamaForCausalLM", "Phi3ForCausalLM", "InternLM3ForCausalLM", "IQuestCoderForCausalLM", "OPTForCausalLM",
    "GraniteForCausalLM", "GraniteSWAForCausalLM", "Exaone4ForCausalLM", "EmbeddingGemma2Model",
})

# The first release whose FlattenedTensorBucket we read `supports_multi_dtypes = True` in (tensor_bucket.py).
MIXED_DTYPE_BUCKETS_SINCE = "0.5.23"


def version_at_least(version: Any, minimum: str) -> bool:
    """"0.5.23.post1" >= "0.5.23"; an unknown or unparsable version counts as older."""
    def numbers(text: str) -> tuple:
        parts = []
        for piece in str(text).split("."):
            digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
            if not digits:
                break
            parts.append(int(digits))
        return tuple(parts)

    return bool(version) and bool(numbers(version)) and numbers(version) >= numbers(minimum)


# Memory tags of /release_memory_occupation and /resume_memory_occupation (sglang 0.5.23 constants.py).
MEMORY_WEIGHTS, MEMORY_KV_CACHE, MEMORY_CUDA_GRAPH = "weights", "kv_cache", "cuda_graph"
MEMORY_TAGS = (MEMORY_WEIGHTS, MEMORY_KV_CACHE, MEMORY_CUDA_GRAPH)

# SamplingParams fields of sglang 0.5.23 (srt/sampling/sampling_params.py) that this client uses.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos", "sampling_seed")


def sampling_dict(sampling: SamplingParams, sampling_seed: Optional[int] = None) -> dict:
    """The `sampling_params` object of one sample."""
    params: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
    }
    if sampling.stop_token_ids:
        params["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        params["ignore_eos"] = True
    if sampling_seed is not None:
        params["sampling_seed"] = int(sampling_seed)
    return params


def generate_payload(prompt: Sequence[int], sampling: SamplingParams, sampling_seed: Optional[int] = None) -> dict:
    """The JSON body of one `/generate` request for one sample of `prompt`."""
    return {"input_ids": [int(t) for t in prompt], "sampling_params": sampling_dict(sampling, sampling_seed),
            "return_logprob": True}


def encode_items(prompts: Sequence[Sequence[int]], n: int, sampling: SamplingParams,
                 seeds: Optional[Sequence[Sequence[int]]]) -> list[tuple[str, str]]:
    """(input_ids JSON, sampling_params JSON) per sample, prompt-major, seeds[p][s] per sample (or
    None). Each prompt is encoded once for its n samples and each sample's params are the shared
    params with its seed spliced in, so building a request costs a string join per sample."""
    base = json.dumps(sampling_dict(sampling), separators=(",", ":"))
    items = []
    for p, prompt in enumerate(prompts):
        # int() first: numpy / tensor ints print as plain decimals; this is json.dumps of a list of
        # ints without building an encoder per prompt
        prompt_json = f"[{','.join(map(str, map(int, prompt)))}]"
        for s in range(n):
            params_json = base if seeds is None else f'{base[:-1]},"sampling_seed":{int(seeds[p][s])}}}'
            items.append((prompt_json, params_json))
    return items


def encode_request(items: Sequence[tuple[str, str]]) -> bytes:
    """The body of one `/generate` request: the single form for one item, the batch form otherwise
    (the single form is the JSON of `generate_payload`)."""
    if len(items) == 1:
        prompt_json, params_json = items[0]
        return f'{{"input_ids":{prompt_json},"sampling_params":{params_json},"return_logprob":true}}'.encode()
    prompts = ",".join(prompt_json for prompt_json, _ in items)
    params = ",".join(params_json for _, params_json in items)
    return f'{{"input_ids":[{prompts}],"sampling_params":[{params}],"return_logprob":true}}'.encode()


def parse_weight_version(value: Any, default: int) -> int:
    """SGLang reports `weight_version` as a string ("default" until a sync sets one)."""
    if value is None or value == "default":  # the common case, without raising
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _parse_result(body: Any, url: str) -> tuple[list[int], Sequence[float], str, Any]:
    """One `/generate` result dict -> (token_ids, log_probs, finish type, weight_version); malformed
    results raise RolloutError naming `url`."""
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise RolloutError(f"{url}/generate: response has no meta_info object: {str(body)[:200]}")
    meta = body["meta_info"]
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in FINISH_REASONS:
        raise RolloutError(f"{url}/generate: meta_info.finish_reason {finish!r} is not an object with type in {list(FINISH_REASONS)}")
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise RolloutError(f"{url}/generate: meta_info.output_token_logprobs missing (was return_logprob sent?)")
    try:  # columns in one C-level pass; a triple of the wrong length makes the unpacking fail
        log_probs, token_ids, _texts = zip(*triples, strict=True) if triples else ((), (), ())
        if None in log_probs:
            raise TypeError
    except (TypeError, ValueError):
        for position, triple in enumerate(triples):
            if not isinstance(triple, (list, tuple)) or len(triple) != 3 or triple[0] is None:
                raise RolloutError(f"{url}/generate: output_token_logprobs[{position}] = {triple!r} is not (logprob, token_id, text)") from None
        raise RolloutError(f"{url}/generate: output_token_logprobs is not a list of (logprob, token_id, text)") from None
    token_ids = list(token_ids)
    output_ids = body.get("output_ids")
    if output_ids is not None and output_ids != token_ids:
        raise RolloutError(f"{url}/generate: output_ids and output_token_logprobs disagree ({len(output_ids)} vs {len(token_ids)} tokens)")
    return token_ids, log_probs, finish["type"], meta.get("weight_version")


def parse_generate_response(body: Any, *, url: str, default_weight_version: int) -> Sample:
    """One `/generate` result dict (or a list holding one) -> `Sample`."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    token_ids, log_probs, finish, version = _parse_result(body, url)
    try:
        return Sample(token_ids=token_ids, log_probs=log_probs, finish_reason=finish,
                      weight_version=parse_weight_version(version, default_weight_version))
    except (TypeError, ValueError) as exc:  # e.g. a non-numeric log-prob
        raise RolloutError(f"{url}/generate: bad output_token_logprobs: {exc}") from None


def parse_batch_response(body: Any, count: int, *, url: str, default_weight_version: int) -> list[Sample]:
    """The response to a batch of `count` items -> `count` Samples in item order."""
    if not isinstance(body, list) or len(body) != count:
        got = f"a list of {len(body)}" if isinstance(body, list) else type(body).__name__
        raise RolloutError(f"{url}/generate: a batch of {count} items was answered with {got} results")
    # Each sample owns its log-prob tensor (views of one batch tensor would pickle the whole batch).
    return [parse_generate_response(item, url=url, default_weight_version=default_weight_version) for item in body]


# ---- weight-update bodies (io_struct.py request structs of 0.5.23; unknown keys are dropped silently
# there, so every key here is checked against the source by tests/rollout/test_sglang_contract.py) ----
def tensor_update_body(payloads: Sequence[str], weight_version: int, load_format: str) -> dict:
    """`UpdateWeightsFromTensorReqInput`: `payloads[i]` is the serialized bucket SGLang TP rank i opens."""
    return {"serialized_named_tensors": list(payloads), "load_format": load_format, "flush_cache": False,
            "weight_version": str(weight_version)}


def init_group_body(group_name: str, master_address: str, master_port: int, rank_offset: int, world_size: int,
                    backend: str) -> dict:
    """`InitWeightsUpdateGroupReqInput`: the server's TP rank r joins as rank `rank_offset + r`."""
    return {"master_address": master_address, "master_port": int(master_port), "rank_offset": int(rank_offset),
            "world_size": int(world_size), "group_name": group_name, "backend": backend}


def broadcast_update_body(group_name: str, names: Sequence[str], dtypes: Sequence[str],
                          shapes: Sequence[Sequence[int]], weight_version: int) -> dict:
    """`UpdateWeightsFromDistributedReqInput`: the tensors rank 0 of `group_name` broadcasts next, in order."""
    return {"names": list(names), "dtypes": list(dtypes), "shapes": [list(s) for s in shapes],
            "group_name": group_name, "flush_cache": False, "weight_version": str(weight_version)}


def destroy_group_body(group_name: str) -> dict:
    """`DestroyWeightsUpdateGroupReqInput`."""
    return {"group_name": group_name}


def disk_update_body(model_path: str, weight_version: int) -> dict:
    """`UpdateWeightFromDiskReqInput` (no abort: the syncer has paused generation already)."""
    return {"model_path": model_path, "weight_version": str(weight_version), "abort_all_requests": False}


def check_update_answers(url_to_body: Mapping[str, Any], what: str) -> None:
    """SGLang answers weight updates with {"success": bool, "message": str}; success false is an error."""
    for url, body in url_to_body.items():
        if isinstance(body, BaseException):
            raise RolloutError(f"{what} on {url}: {type(body).__name__}: {body}")
        if isinstance(body, dict) and body.get("success") is False:
            raise RolloutError(f"{what} on {url} failed: {body.get('message')}")
