"""Colocated fleets on several nodes: per-node launch plans with node-local GPU ids (2 nodes x 8 GPUs),
and the per-GPU routing of CUDA IPC payloads (each SGLang TP rank gets the bucket of the trainer rank
on its own GPU of its own node)."""
import pytest

from maspo_megatron.config import SGLangConfig
from maspo_megatron.rollout.sglang.launcher import ServerSlot, ipc_routes, plan_servers, server_command


def test_two_nodes_of_eight_gpus_tp2():
    cfg = SGLangConfig(num_servers=4, tp_size=2)
    slots = plan_servers(cfg, num_nodes=2, gpus_per_node=8)
    assert len(slots) == 8
    for node in (0, 1):  # the same node-local ids on both nodes: never --base-gpu-id 8..15
        mine = [s for s in slots if s.node == node]
        assert [s.gpu_ids for s in mine] == [(0, 1), (2, 3), (4, 5), (6, 7)]
        assert [s.index_on_node for s in mine] == [0, 1, 2, 3]
    argv = server_command(cfg, "/m", 30000, slots[7].index_on_node, 30001)
    assert argv[argv.index("--base-gpu-id") + 1] == "6"


def test_plans_that_run_past_the_node_are_refused():
    with pytest.raises(ValueError, match="num_servers 3 x tp_size 4 .* runs past a node's 8 GPUs"):
        plan_servers(SGLangConfig(num_servers=3, tp_size=4), num_nodes=2, gpus_per_node=8)
    with pytest.raises(ValueError, match="base_gpu_id 4"):
        plan_servers(SGLangConfig(num_servers=2, tp_size=4, base_gpu_id=4), num_nodes=1, gpus_per_node=8)
    assert len(plan_servers(SGLangConfig(num_servers=2, tp_size=2, dp_size=2), 1, 8)) == 2


def test_ipc_payloads_route_to_the_trainer_rank_on_each_servers_own_gpu():
    cfg = SGLangConfig(num_servers=4, tp_size=2)
    slots = plan_servers(cfg, num_nodes=2, gpus_per_node=8)
    urls = [f"http://node{s.node}:{30000 + s.index_on_node}" for s in slots]
    # what an all-gather of (node, local GPU) over 16 trainer ranks (srun: rank = node * 8 + local rank) gives
    rank_of_gpu = {(rank // 8, rank % 8): rank for rank in range(16)}
    routes = ipc_routes(slots, urls, rank_of_gpu)
    assert routes["http://node0:30000"] == [0, 1]
    assert routes["http://node1:30002"] == [12, 13]  # node 1's GPUs 4, 5: ranks of node 1, never GPU 0 of node 0
    assert sorted(r for ranks in routes.values() for r in ranks) == list(range(16))  # each GPU's rank exactly once
    partial = {key: rank for key, rank in rank_of_gpu.items() if key != (1, 5)}
    with pytest.raises(ValueError, match=r"node1:30002 \(node 1\) runs on GPUs \[5\]"):
        ipc_routes(slots, urls, partial)
    assert ipc_routes([ServerSlot(0, 0, (3,))], ["u"], {(0, 3): 9}) == {"u": [9]}
