"""The stand-in refuses what SGLang 0.5.23 refuses (so client tests against it mean something)."""
import base64
import pickle
import threading
import time

import requests
import torch
from safetensors.torch import save_file

from tests.helpers import sglang_source
from tests.rollout.conftest import tiny_model


def post(server, path, body=None):
    return requests.post(server.url + path, json=body if body is not None else {}, timeout=30)


def test_generate_schema_is_strict(standin):
    server = standin()
    ok = post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}, "return_logprob": True})
    assert ok.status_code == 200
    body = ok.json()
    assert body["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    triples = body["meta_info"]["output_token_logprobs"]
    assert [len(t) for t in triples] == [3, 3, 3] and [t[1] for t in triples] == body["output_ids"] and triples[0][2] is None
    unknown = post(server, "/generate", {"input_ids": [1], "return_logprobs": True})
    assert unknown.status_code == 400 and "return_logprobs" in unknown.json()["message"]
    bad_param = post(server, "/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})
    assert bad_param.status_code == 400 and "max_tokens" in bad_param.json()["message"]
    assert post(server, "/generate", {"input_ids": [1], "sampling_params": {"top_p": 0}}).status_code == 400
    # n > 1 on one prompt returns a list of n results.
    many = post(server, "/generate", {"input_ids": [1, 2], "sampling_params": {"n": 3, "max_new_tokens": 2}})
    assert many.status_code == 200 and len(many.json()) == 3


def test_flush_refused_while_requests_queued(standin):
    server = standin(token_delay_s=0.05)
    worker = threading.Thread(target=post, args=(server, "/generate", {"input_ids": [1], "sampling_params": {"max_new_tokens": 20, "ignore_eos": True}}))
    worker.start()
    time.sleep(0.3)
    assert post(server, "/flush_cache").status_code == 400
    worker.join(30)
    assert post(server, "/flush_cache").status_code == 200


def _tensor_payload(named, flattened=False):
    """A payload as SGLang's own producer builds it (its FlattenedTensorBucket, when its source is here)."""
    if not flattened:
        return base64.b64encode(pickle.dumps(named)).decode()
    if sglang_source.sglang_root() is not None:
        bucket = sglang_source.tensor_bucket().FlattenedTensorBucket(named_tensors=named)
        obj = {"flattened_tensor": bucket.get_flattened_tensor(), "metadata": bucket.get_metadata()}
        return base64.b64encode(pickle.dumps(obj)).decode()
    chunks, metadata, offset = [], [], 0
    for name, tensor in named:
        raw = tensor.contiguous().view(-1).view(torch.uint8)
        metadata.append({"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype), "start_idx": offset,
                         "end_idx": offset + raw.numel(), "numel": tensor.numel()})
        chunks.append(raw)
        offset += raw.numel()
    return base64.b64encode(pickle.dumps({"flattened_tensor": torch.cat(chunks), "metadata": metadata})).decode()


def test_weight_updates_need_a_session_and_really_load(standin, tmp_path):
    server = standin(tp_size=2, readback_any_model=True)
    state = tiny_model(9).state_dict()
    named = [("model.norm.weight", state["model.norm.weight"]), ("lm_head.weight", state["lm_head.weight"])]
    body = {"serialized_named_tensors": [_tensor_payload(named, True)] * 2, "load_format": "flattened_bucket", "weight_version": "3"}
    refused = post(server, "/update_weights_from_tensor", body)
    assert refused.status_code == 400 and "begin_weight_update" in refused.json()["message"]
    assert post(server, "/end_weight_update").status_code == 400
    assert post(server, "/begin_weight_update").status_code == 200
    assert post(server, "/begin_weight_update").status_code == 400  # already open
    assert post(server, "/update_weights_from_tensor", dict(body, serialized_named_tensors=body["serialized_named_tensors"][:1])).status_code == 400  # one per TP rank
    assert post(server, "/update_weights_from_tensor", body).status_code == 200
    plain = {"serialized_named_tensors": [_tensor_payload([("model.embed_tokens.weight", state["model.embed_tokens.weight"])])] * 2}
    assert post(server, "/update_weights_from_tensor", plain).status_code == 200
    assert post(server, "/end_weight_update").status_code == 200
    got = post(server, "/get_weights_by_name", {"name": "lm_head.weight", "truncate_size": 2}).json()
    assert torch.tensor(got).equal(state["lm_head.weight"][:2])
    assert requests.get(server.url + "/model_info", timeout=10).json()["weight_version"] == "3"
    # disk updates do not need a session
    save_file({"model.norm.weight": torch.full_like(state["model.norm.weight"], 0.5)}, str(tmp_path / "model.safetensors"))
    assert post(server, "/update_weights_from_disk", {"model_path": str(tmp_path), "weight_version": "4"}).status_code == 200
    assert post(server, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 1}).json() == [0.5]
    assert post(server, "/get_weights_by_name", {"name": "nope"}).status_code == 400
    assert post(server, "/update_weights_from_disk", {"model_path": str(tmp_path), "bogus": 1}).status_code == 400


def test_api_key_memory_saver_and_old_servers(standin):
    keyed = standin(api_key="k")
    assert requests.get(keyed.url + "/health_generate", timeout=10).status_code == 200
    assert post(keyed, "/flush_cache").status_code == 401
    assert requests.post(keyed.url + "/flush_cache", headers={"Authorization": "Bearer k"}, timeout=10).status_code == 200
    assert post(keyed, "/release_memory_occupation", {"tags": ["kv_cache"]}).status_code == 401
    no_saver = standin()
    assert post(no_saver, "/release_memory_occupation", {"tags": ["kv_cache"]}).status_code == 400
    old = standin(weight_session=False)
    assert post(old, "/begin_weight_update").status_code == 404


def test_distributed_update_over_gloo(standin):
    """The trainer side of SGLang's update group: TCPStore master, gloo rank 0 under init_custom_process_group's keys."""
    import datetime

    import torch.distributed as dist

    from maspo_megatron.utils.ports import free_port

    server = standin(readback_any_model=True)
    port = free_port()
    store = dist.TCPStore("127.0.0.1", port, 2, True, timeout=datetime.timedelta(seconds=60), wait_for_workers=False)
    init = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2,
            "group_name": "g0", "backend": "gloo"}
    answers = {}
    joiner = threading.Thread(target=lambda: answers.update(init=post(server, "/init_weights_update_group", init)))
    joiner.start()
    # SGLang's init_custom_process_group key layout: PrefixStore(group_name), to which torch's
    # _new_process_group_helper adds "<group_name>/" and "<device>/" (built by hand: the in-process
    # stand-in has registered the group name "g0" in this process's c10d world already)
    group = dist.ProcessGroupGloo(dist.PrefixStore("cpu/", dist.PrefixStore("g0/", dist.PrefixStore("g0", store))), 0, 2)
    joiner.join(60)
    assert answers["init"].status_code == 200
    assert post(server, "/init_weights_update_group", dict(init, backend="nccl")).status_code == 400  # CPU: gloo only
    new_norm = torch.full((32,), 0.25)
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[32]], "group_name": "g0", "weight_version": "5"}
    assert post(server, "/update_weights_from_distributed", body).status_code == 400  # no session
    assert post(server, "/begin_weight_update").status_code == 200
    sender = threading.Thread(target=lambda: answers.update(update=post(server, "/update_weights_from_distributed", body)))
    sender.start()
    group.broadcast(new_norm, 0).wait()
    sender.join(60)
    assert answers["update"].status_code == 200
    assert post(server, "/end_weight_update").status_code == 200
    assert post(server, "/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": 3}).json() == [0.25] * 3
    assert post(server, "/destroy_weights_update_group", {"group_name": "g0"}).status_code == 200
