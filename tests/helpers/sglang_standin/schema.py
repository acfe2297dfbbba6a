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

from typing import Any, Optional

from tests.helpers import sglang_source
from tests.helpers.sglang_source import SGLANG_VERSION

# What the stand-in implements (its own capability; SGLang's field lists come from its source:
# tests/helpers/sglang_source.py). A non-empty field outside these sets is a 400 here.
GENERATE_IMPLEMENTED = frozenset({"rid", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
                                  "stream", "log_metrics", "return_text_in_logprobs", "top_logprobs_num"})
SAMPLING_IMPLEMENTED = frozenset({"max_new_tokens", "stop_token_ids", "temperature", "top_p", "top_k", "n",
                                  "ignore_eos", "sampling_seed", "skip_special_tokens",
                                  "spaces_between_special_tokens", "no_stop_trim"})
SAMPLING_DEFAULTS = {"max_new_tokens": 128, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "n": 1,
                     "ignore_eos": False, "stop_token_ids": None, "sampling_seed": None}
_EMPTY = (None, False, [], {})


class BadRequest(Exception):
    """Answered with HTTP 400 and this message."""


def check_fields(body: Any, implemented: frozenset, what: str, struct: Optional[str] = None) -> None:
    """`body` against SGLang's io_struct `struct` (when its source is here: unknown keys, which the real
    server drops silently, and missing required ones are a 400), then against what the stand-in implements."""
    if not isinstance(body, dict):
        raise BadRequest(f"{what}: expected a JSON object")
    fields = _sglang_fields(struct)
    if fields is not None:
        unknown = sorted(body.keys() - fields.keys())
        if unknown:
            raise BadRequest(f"{what}: {unknown} are not fields of sglang {SGLANG_VERSION} {struct} (the real server "
                             "would drop them silently)")
        missing = sorted(k for k, required in fields.items() if required and k not in body)
        if missing:
            raise BadRequest(f"{what}: required field(s) {missing} of sglang {struct} missing")
    elif body.keys() - implemented:  # no SGLang source to judge by: only what the stand-in knows
        raise BadRequest(f"{what}: unexpected field(s) {sorted(body.keys() - implemented)}")
    unimplemented = sorted(k for k in body.keys() - implemented if body[k] not in _EMPTY)
    if unimplemented:
        raise BadRequest(f"{what}: field(s) {unimplemented} are valid SGLang but not implemented by the stand-in")


def _sglang_fields(struct: Optional[str]) -> Optional[dict]:
    """{field: required} of io_struct `struct` from SGLang's source, or None (no struct, or no source)."""
    if struct is None or sglang_source.sglang_root() is None:
        return None
    return sglang_source.request_fields()[struct]


def verify_sampling(sampling: Any, what: str = "SamplingParams") -> dict:
    """One sampling_params dict -> the full parameter dict; SGLang's `SamplingParams.verify` errors as 400.
    (Unknown keys and wrong types were refused before, by SGLang's contract decoder.)"""
    if sampling is None:
        sampling = {}
    check_fields(sampling, SAMPLING_IMPLEMENTED, what)
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
    if sglang_source.sglang_root() is not None:
        contract_error = sglang_source.generate_contract_error(body)
        if contract_error is not None:  # what http_server.py answers: 400 {"error": message}
            raise BadRequest(f"GenerateRequest contract: {contract_error}")
    check_fields(body, GENERATE_IMPLEMENTED, "GenerateReqInput")
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
