"""Per-GPU CUDA IPC routing of the `tensor` transport (issue 15): each SGLang TP rank gets the payload that
the trainer rank on ITS OWN GPU of ITS OWN node made from its own copy of the bucket.

Four gloo processes run a TP2 x DP2 policy (rank 0 the stage source, rank 1 its TP peer, ranks 2-3 the
second replica) and a made-up two-node layout: ranks 2, 3 on node 0's GPUs 0, 1 and ranks 0, 1 on node 1's.
Two stand-in servers with two TP ranks each (one per node) decode every payload with SGLang 0.5.23's own
FlattenedTensorBucket and refuse a request whose TP payloads differ."""
import torch

from tests.helpers.multiproc import run_distributed
from tests.helpers.sglang_source import require_sglang
from tests.weight_sync import _sync_cases as cases

# (node, node-local GPU) -> trainer rank: the reverse of the process order, so routing by rank order fails
LAYOUT = {(0, 0): 2, (0, 1): 3, (1, 0): 0, (1, 1): 1}


def case_two_nodes(urls: list) -> dict:
    import torch.distributed as dist

    from maspo_megatron.config.rollout import SGLangConfig
    from maspo_megatron.rollout.sglang.engine import SGLangEngine
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer, close_rollout

    dims, chunks, wmap = cases.build_policy(False, tp=2, pp=1)
    rank0 = dist.get_rank() == 0
    engine = SGLangEngine(SGLangConfig(urls=urls, tp_size=2)) if rank0 else None
    # small buckets: several rounds, the TP peer joins each one at its bucket boundary
    cfg = cases.weight_sync_cfg(transport="tensor", bucket_bytes=16 * 1024)
    syncer = WeightSyncer(cfg, chunks, wmap, dims, engine=engine, engine_kind="sglang")
    syncer.transport.rank_of_gpu = dict(LAYOUT)
    out = {"rank": dist.get_rank()}
    try:
        report = syncer.sync(weight_version=7)
        expected = cases.export_reference(dims, chunks, wmap)
        out["payloads_made"] = syncer.transport.payloads_made
        if rank0:
            out.update(report=report, expected=expected, last_post=syncer.transport.last_post,
                       held=[cases.server_weights(SGLangEngine(SGLangConfig(urls=[url])), expected) for url in urls])
    finally:
        close_rollout(syncer, engine)
    return out


def test_each_tp_rank_gets_the_payload_of_the_rank_on_its_own_gpu(tmp_path):
    require_sglang()  # the stand-in decodes with SGLang's own FlattenedTensorBucket
    from tests.helpers.sglang_standin import StandinServer

    model_dir = tmp_path / "engine_model"
    cases.hf_model(False, cases.SEED_ENGINE).save_pretrained(model_dir)
    servers = [StandinServer(str(model_dir), tp_size=2, readback_any_model=True).start() for _ in range(2)]
    urls = [server.url for server in servers]  # node-major, as the fleet lists them: server 0 on node 0
    try:
        results = run_distributed(case_two_nodes, 4, urls, timeout_s=300)
    finally:
        for server in servers:
            server.stop()
    rank0 = results[0]
    # node 0's server (GPUs 0, 1) maps the copies of ranks 2, 3; node 1's those of ranks 0, 1 (never all rank 0's)
    assert rank0["last_post"] == {urls[0]: [2, 3], urls[1]: [0, 1]}
    buckets = rank0["report"].num_buckets
    assert buckets >= 3
    assert [r["payloads_made"] for r in results] == [buckets] * 4  # every rank serialized its own copy, once a bucket
    for held in rank0["held"]:  # what landed (TP rank 0's payload; the stand-in refused differing TP payloads)
        assert set(held) == set(rank0["expected"])
        for name, tensor in rank0["expected"].items():
            assert torch.equal(held[name], tensor), name
