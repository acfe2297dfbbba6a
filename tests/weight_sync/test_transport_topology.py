"""Weight transports on real topologies, checked on CPU: where each NCCL stage source binds and what it
advertises (TP8 x PP4 on 8 nodes of 8 GPUs), and the start-up refusals of NCCL into servers it cannot
reach (colocated on the trainer's GPUs, dp_size > 1)."""
import socket
import sys
import types

import pytest

from maspo_megatron.config import SGLangConfig
from maspo_megatron.config.rollout import WeightSyncConfig
from maspo_megatron.rollout.sglang import SGLangEngine
from maspo_megatron.rollout.weight_sync.transports.distributed import DistributedTransport, source_address
from maspo_megatron.utils.ports import free_port
from tests.helpers.sglang_standin.process import PACKAGE_DIR as STANDIN_SCRIPT


def _stage_source_ranks(tp: int, cp: int, dp: int, pp: int) -> list[int]:
    """Global rank of (tp 0, cp 0, dp 0) of each stage in Megatron's default order tp-cp-ep-dp-pp
    (rank = tp + TP * (cp + CP * (dp + DP * pp))), written out independently of the trainer."""
    return [0 + tp * (0 + cp * (0 + dp * stage)) for stage in range(pp)]


def test_nccl_sources_bind_and_advertise_their_own_node_tp8_pp4_on_8_nodes():
    gpus_per_node, nodes, tp, pp = 8, 8, 8, 4
    dp = nodes * gpus_per_node // (tp * pp)  # 2
    nodes_of = {rank: f"gpu{rank // gpus_per_node:02d}" for rank in range(nodes * gpus_per_node)}
    sources = _stage_source_ranks(tp, 1, dp, pp)
    assert sources == [0, 16, 32, 48]
    addresses = [source_address("gpu00", this_node=nodes_of[rank]) for rank in sources]
    assert addresses == ["gpu00", "gpu02", "gpu04", "gpu06"]  # each stage on its own node, none on gpu00 but stage 0
    # the FQDN form of a node still counts as that node; an interface address given for rank 0's node stays
    assert source_address("gpu00", this_node="gpu00.cluster.local") == "gpu00"
    assert source_address("10.1.0.7", this_node="gpu03") == "gpu03"
    assert source_address("127.0.0.1", this_node="gpu05") == "127.0.0.1"  # one node: loopback everywhere


def test_a_source_can_bind_its_own_address():
    own = socket.gethostname()
    assert free_port(source_address("some-other-head-node", this_node=own)) > 0


@pytest.fixture
def launched_engine(tmp_path):
    """Servers this job launched (colocated on its GPUs): a zero-latency stand-in subprocess."""
    cfg = SGLangConfig(launch_command=[sys.executable, STANDIN_SCRIPT, "--zero-latency"], startup_timeout_s=120,
                       log_dir=str(tmp_path))
    engine = SGLangEngine(cfg, model_path=str(tmp_path))
    yield engine
    engine.shutdown()


def _transport(engine, backend):
    transport = DistributedTransport(WeightSyncConfig(transport="distributed"), types.SimpleNamespace(pp_rank=0), engine)
    transport.backend = backend  # what a CUDA node would pick
    return transport


def test_nccl_into_colocated_servers_is_refused_at_start_up(launched_engine):
    assert launched_engine.shares_trainer_gpus
    message = _transport(launched_engine, "nccl").receiver_error()
    assert "'distributed' cannot reach servers on the trainer's own GPUs" in message and "'tensor'" in message
    assert _transport(launched_engine, "gloo").receiver_error() is None  # CPU: gloo ranks may share a host


def test_nccl_with_server_data_parallel_is_refused():
    from tests.helpers.sglang_standin import StandinServer

    server = StandinServer(zero_latency=True).start()
    engine = SGLangEngine(SGLangConfig(urls=[server.url], dp_size=2))
    try:
        assert "rollout.sglang.dp_size > 1" in _transport(engine, "nccl").receiver_error()
    finally:
        engine.shutdown()
    engine = SGLangEngine(SGLangConfig(urls=[server.url]))
    try:
        assert _transport(engine, "nccl").receiver_error() is None  # external servers on other nodes: fine
    finally:
        engine.shutdown()
        server.stop()


def test_mixed_dtype_buckets_only_where_the_server_takes_them():
    """0.5.23's FlattenedTensorBucket takes mixed dtypes; for older servers (by /server_info) the tensor
    transport sends one dtype per bucket, and such a server refuses a mixed one."""
    import requests
    import torch

    from maspo_megatron.rollout.sglang.protocol import version_at_least
    from maspo_megatron.rollout.weight_sync.flattened_bucket import flatten_tensors, serialize_payload
    from maspo_megatron.rollout.weight_sync.transports.tensor import split_by_dtype
    from tests.helpers.sglang_standin import StandinServer

    assert version_at_least("0.5.23", "0.5.23") and version_at_least("0.5.23.post2", "0.5.23")
    assert version_at_least("0.6.0rc1", "0.5.23") and not version_at_least("0.5.9", "0.5.23")
    assert not version_at_least(None, "0.5.23") and not version_at_least("dev", "0.5.23")
    bucket = [("a", torch.zeros(2, dtype=torch.bfloat16)), ("b", torch.ones(3)), ("c", torch.zeros(4, dtype=torch.bfloat16))]
    assert [[n for n, _ in part] for part in split_by_dtype(bucket)] == [["a", "c"], ["b"]]
    servers = [StandinServer(zero_latency=True).start(), StandinServer(zero_latency=True, version="0.5.2").start()]
    engines = [SGLangEngine(SGLangConfig(urls=[s.url])) for s in servers]
    try:
        assert [e.accepts_mixed_dtype_buckets for e in engines] == [True, False]
        old = servers[1]
        payload = serialize_payload(*flatten_tensors(bucket))  # mixed bf16 / fp32
        requests.post(old.url + "/begin_weight_update", json={}, timeout=10)
        answer = requests.post(old.url + "/update_weights_from_tensor", timeout=10, json={
            "serialized_named_tensors": [payload], "load_format": "flattened_bucket"})
        assert answer.status_code == 400 and "one dtype per bucket" in answer.text
    finally:
        for engine in engines:
            engine.shutdown()
        for server in servers:
            server.stop()


def test_transports_know_no_sglang_json():
    """The engine owns its protocol: no transport names an SGLang endpoint or a request-body key (they
    call the receiver methods of weight_sync/receiver.py; rollout/sglang/protocol.py builds the bodies)."""
    from pathlib import Path

    import maspo_megatron.rollout.weight_sync.transports as transports

    body_keys = [f'"{key}"' for key in ("serialized_named_tensors", "load_format", "master_address", "master_port",
                                        "rank_offset", "world_size", "group_name", "backend", "names", "dtypes",
                                        "shapes", "flush_cache", "abort_all_requests", "model_path", "weight_version")]
    for path in sorted(Path(transports.__file__).parent.glob("*.py")):
        text = path.read_text()
        assert '"/' not in text, f"{path.name} names an HTTP endpoint"
        leaked = [key for key in body_keys if key in text]
        assert not leaked, f"{path.name} builds SGLang request bodies: {leaked}"
