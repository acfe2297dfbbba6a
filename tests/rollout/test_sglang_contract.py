"""What the trainer sends to SGLang, judged by SGLang 0.5.23's own code (tests/helpers/sglang_source.py):
its `/generate` contract decoder, its io_struct request structs, its route list, its FlattenedTensorBucket.
Skipped, with the reason, when the source is not installed (tools/install_sglang_src.sh)."""
import base64
import io
import pickle

import pytest
import torch

from maspo_megatron.rollout.sglang.protocol import encode_items, encode_request, generate_payload
from maspo_megatron.rollout.types import SamplingParams
from maspo_megatron.rollout.weight_sync.flattened_bucket import flatten_tensors, serialize_payload
from tests.helpers import sglang_source
from tests.rollout.conftest import PROMPTS, engine_for


@pytest.fixture(autouse=True)
def _needs_sglang_source():
    sglang_source.require_sglang()


SAMPLINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.7, top_p=0.9, top_k=20, max_new_tokens=5, stop_token_ids=(3, 4), ignore_eos=True),
    SamplingParams(top_k=1, seed=11),
]


def _json(raw: bytes):
    import json

    return json.loads(raw)


@pytest.mark.parametrize("sampling", SAMPLINGS)
def test_generate_bodies_pass_sglangs_contract_decoder(sampling):
    seeds = [[1000 * p + s for s in range(3)] for p in range(len(PROMPTS))]
    items = encode_items(PROMPTS, 3, sampling, seeds if sampling.seed is not None else None)
    bodies = [_json(encode_request(items[:1])), _json(encode_request(items)), generate_payload(PROMPTS[0], sampling, 7)]
    for body in bodies:
        assert sglang_source.generate_contract_error(body) is None, body
    decoded = sglang_source.generate_contract().GenerateRequest.from_json_value(bodies[1])
    assert decoded.return_logprob is True and decoded.input_ids == [p for p in PROMPTS for _ in range(3)]
    per_item = decoded.sampling_params
    assert len(per_item) == 9 and per_item[0].max_new_tokens == sampling.max_new_tokens
    assert per_item[0].top_k == sampling.top_k and per_item[0].ignore_eos == sampling.ignore_eos
    if sampling.seed is not None:
        assert [p.sampling_seed for p in per_item] == [seed for row in seeds for seed in row]


def test_the_decoder_judges():  # the judge can say no: a misspelt sampling key and a wrong type
    assert "max_tokens" in sglang_source.generate_contract_error({"input_ids": [1], "sampling_params": {"max_tokens": 1}})
    assert sglang_source.generate_contract_error({"input_ids": [1], "return_logprob": "yes"}) is not None


def test_every_endpoint_and_body_the_engine_sends_exists_in_sglang(standin):
    """A full control-plane round (generate, pause, flush, weight session, memory, continue, abort) against
    a stand-in that records each request; each path and method must be a 0.5.23 route and each body's keys
    fields of that route's io_struct request (those structs drop unknown keys silently)."""
    server = standin(zero_latency=True, enable_memory_saver=True)
    engine = engine_for(server.url)
    try:
        engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=2, seed=3))
        engine.pause_generation()
        engine.flush_cache()
        engine.release_memory_occupation(["kv_cache"])
        engine.resume_memory_occupation(["kv_cache"])
        assert engine.begin_weight_update() is True
        engine.end_weight_update()
        engine.continue_generation()
        engine.abort()
    finally:
        engine.shutdown()
    routes = sglang_source.routes()
    fields = sglang_source.request_fields()
    seen = server.call(lambda: list(server.requests_seen))
    assert {path for _, path, _ in seen} >= {"/generate", "/pause_generation", "/flush_cache", "/begin_weight_update",
                                            "/end_weight_update", "/continue_generation", "/abort_request",
                                            "/release_memory_occupation", "/resume_memory_occupation"}
    for method, path, body in seen:
        assert path in routes and method in routes[path][0], f"{method} {path} is not a route of sglang 0.5.23"
        struct = routes[path][1]
        if struct is None or struct == "GenerateReqInput" or not isinstance(body, dict):
            continue
        unknown = set(body) - set(fields[struct])
        assert not unknown, f"{path}: {sorted(unknown)} are not fields of {struct}"
        missing = {k for k, required in fields[struct].items() if required} - set(body)
        assert not missing, f"{path}: required {sorted(missing)} of {struct} not sent"


def _mixed_bucket():
    gen = torch.Generator().manual_seed(3)
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(4, 6, generator=gen).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(7, generator=gen)),  # 28 bytes: the next start is re-aligned
        ("model.layers.0.mlp.down_proj.weight", torch.randn(3, 5, generator=gen).to(torch.float8_e4m3fn)),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.rand(1, 1, generator=gen)),
    ]


def test_flattened_payload_decodes_with_sglangs_bucket_class():
    """The CPU payload, unpickled with SGLang's metadata class and rebuilt by its FlattenedTensorBucket
    (what its model runner does with load_format "flattened_bucket"), is the bucket bit for bit."""
    module = sglang_source.tensor_bucket()
    assert module.FlattenedTensorBucket.supports_multi_dtypes is True  # mixed dtypes in one bucket are allowed
    named = _mixed_bucket()
    payload = serialize_payload(*flatten_tensors(named))

    class Unpickler(pickle.Unpickler):
        def find_class(self, mod, name):
            if mod.startswith("sglang"):
                assert (mod, name) == (module.__name__, "FlattenedTensorMetadata")
            return super().find_class(mod, name)

    obj = Unpickler(io.BytesIO(base64.b64decode(payload))).load()
    assert all(type(m) is module.FlattenedTensorMetadata for m in obj["metadata"])
    rebuilt = module.FlattenedTensorBucket(flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]).reconstruct_tensors()
    assert [n for n, _ in rebuilt] == [n for n, _ in named]
    for (_, want), (name, have) in zip(named, rebuilt, strict=True):
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have.view(torch.uint8), want.contiguous().view(torch.uint8)), name


def test_readback_model_classes_match_sglangs_source():
    """verify_weights' start-up refusal names the classes 0.5.23 can read back: the list is the source's."""
    from maspo_megatron.rollout.sglang.protocol import WEIGHTS_BY_NAME_ARCHITECTURES

    derived = sglang_source.weights_by_name_architectures()
    assert WEIGHTS_BY_NAME_ARCHITECTURES == derived
    assert "LlamaForCausalLM" in derived and not {"Qwen2ForCausalLM", "Qwen3ForCausalLM"} & derived


def test_weight_update_bodies_are_sglang_request_structs():
    """Each weight-update body the engine builds has only fields of its io_struct struct (unknown keys would
    be dropped silently there) and every required one; the route of each exists and takes that struct."""
    from maspo_megatron.rollout.sglang import protocol

    bodies = {
        "/update_weights_from_tensor": protocol.tensor_update_body(["payload-rank0", "payload-rank1"], 3, "flattened_bucket"),
        "/init_weights_update_group": protocol.init_group_body("g", "10.0.0.1", 1234, 1, 9, "nccl"),
        "/update_weights_from_distributed": protocol.broadcast_update_body("g", ["w"], ["bfloat16"], [[2, 3]], 3),
        "/destroy_weights_update_group": protocol.destroy_group_body("g"),
        "/update_weights_from_disk": protocol.disk_update_body("/shared/v3", 3),
    }
    routes, fields = sglang_source.routes(), sglang_source.request_fields()
    for path, body in bodies.items():
        methods, struct = routes[path]
        assert "POST" in methods and struct is not None, path
        assert set(body) <= set(fields[struct]), (path, set(body) - set(fields[struct]))
        assert {k for k, required in fields[struct].items() if required} <= set(body), path
        assert body.get("weight_version", "3") == "3"  # a string in every struct that has it
