"""A protocol-faithful stand-in for an SGLang 0.5.23 server (aiohttp), for CPU tests.

It really generates with a tiny `transformers` model (continuous batching: every running request
advances one token per step, each with its own forward so results do not depend on what else runs),
and is strict where the real server is:
- 400 on unknown `/generate` fields or sampling params (and on known ones it does not implement);
  batch requests (`input_ids` as a list of lists, per-item or shared `sampling_params`, `rid`,
  `return_logprob`) are normalised and checked as `GenerateReqInput` does (schema.py);
- `output_token_logprobs` as (logprob, token_id, text) triples, `finish_reason` objects, one result
  per batch item;
- `/flush_cache` refused (400) while requests are waiting or running;
- `/update_weights_from_tensor|distributed` refused outside `/begin_weight_update` ...
  `/end_weight_update` (`--no-weight-session` emulates servers older than 0.5.23: 404 there);
- `--api-key`: every path but /health* needs `Authorization: Bearer <key>` (else 401);
- memory release/resume need `--enable-memory-saver` and an idle server.

Modules: schema.py (the /generate schema), generation.py (/generate, abort, the scheduler),
weights.py (weight endpoints, gloo groups joined as SGLang joins them), server.py (routes, control
plane, start/stop, command line).

Zero-latency mode (`--zero-latency`): no model; `/generate` answers at once with fixed tokens.
Use in-process (`StandinServer(...).start()`) or as a subprocess: `python tests/helpers/sglang_standin
--model-path DIR --port P` (accepts the `sglang.launch_server` flags the launcher passes).
"""
from tests.helpers.sglang_standin.schema import BadRequest
from tests.helpers.sglang_standin.server import StandinServer, main
from tests.helpers.sglang_standin.weights import init_custom_process_group

__all__ = ["BadRequest", "StandinServer", "init_custom_process_group", "main"]
