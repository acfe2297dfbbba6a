"""The SGLang 0.5.23 `/generate` schema, in one place: request bodies out, `Sample`s in.

Request (one sample per request, so retries and seeds are per sample):
    {"input_ids": [int], "sampling_params": {...}, "return_logprob": true}
Response (non-streaming, single input):
    {"text": str, "output_ids": [int], "meta_info": {
        "finish_reason": {"type": "stop"|"length"|"abort", ...},
        "output_token_logprobs": [[logprob, token_id, text|null], ...],
        "weight_version": str, "completion_tokens": int, ...}}
Unknown request fields and unknown sampling params are a 400 on the server, so nothing else is sent.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from maspo_megatron.rollout.types import FINISH_REASONS, RolloutError, Sample, SamplingParams

# SamplingParams fields of sglang 0.5.23 (srt/sampling/sampling_params.py) that this client uses.
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k", "stop_token_ids", "ignore_eos", "sampling_seed")


def generate_payload(prompt: Sequence[int], sampling: SamplingParams, sampling_seed: Optional[int] = None) -> dict:
    """The JSON body of one `/generate` request for one sample of `prompt`."""
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
    return {"input_ids": [int(t) for t in prompt], "sampling_params": params, "return_logprob": True}


def parse_weight_version(value: Any, default: int) -> int:
    """SGLang reports `weight_version` as a string ("default" until a sync sets one)."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def parse_generate_response(body: Any, *, url: str, default_weight_version: int) -> Sample:
    """One `/generate` response dict -> `Sample`; malformed bodies raise RolloutError naming `url`."""
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    if not isinstance(body, dict) or not isinstance(body.get("meta_info"), dict):
        raise RolloutError(f"{url}/generate: response has no meta_info object: {str(body)[:200]}")
    meta = body["meta_info"]
    finish = meta.get("finish_reason")
    if not isinstance(finish, dict) or finish.get("type") not in FINISH_REASONS:
        raise RolloutError(f"{url}/generate: meta_info.finish_reason {finish!r} is not an object with type in {list(FINISH_REASONS)}")
    triples = meta.get("output_token_logprobs")
    if not isinstance(triples, list):
        raise RolloutError(f"{url}/generate: meta_info.output_token_logprobs missing (was return_logprob sent?)")
    token_ids, log_probs = [], []
    for position, triple in enumerate(triples):
        if not isinstance(triple, (list, tuple)) or len(triple) != 3 or triple[0] is None:
            raise RolloutError(f"{url}/generate: output_token_logprobs[{position}] = {triple!r} is not (logprob, token_id, text)")
        log_probs.append(float(triple[0]))
        token_ids.append(int(triple[1]))
    output_ids = body.get("output_ids")
    if output_ids is not None and list(output_ids) != token_ids:
        raise RolloutError(f"{url}/generate: output_ids and output_token_logprobs disagree ({len(output_ids)} vs {len(token_ids)} tokens)")
    return Sample(
        token_ids=token_ids,
        log_probs=log_probs,
        finish_reason=finish["type"],
        weight_version=parse_weight_version(meta.get("weight_version"), default_weight_version),
    )
