"""Colocated servers on every node: each node's first rank launches its servers (stand-in subprocesses
here), every rank gets every URL, the driver's engine reaches them all; a node that fails to start its
servers stops every rank with its error."""
import sys

from tests.helpers.multiproc import run_distributed
from tests.helpers.sglang_standin.process import PACKAGE_DIR as STANDIN_SCRIPT

RANKS_PER_NODE = 2  # 4 gloo ranks = 2 "nodes" of 2


def _fleet_case(log_dir: str, fail_node: int) -> dict:
    import dataclasses
    import os

    import torch.distributed as dist

    from maspo_megatron.config import SGLangConfig
    from maspo_megatron.rollout import SamplingParams
    from maspo_megatron.rollout.sglang import SGLangEngine
    from maspo_megatron.rollout.sglang.fleet import start_colocated_fleet
    from maspo_megatron.rollout.types import RolloutError

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    node, local_rank = divmod(rank, RANKS_PER_NODE)
    command = [sys.executable, STANDIN_SCRIPT, "--zero-latency"]
    if node == fail_node:
        command += ["--fail-startup", f"no GPU on node {node}"]
    cfg = SGLangConfig(num_servers=2, launch_command=command, startup_timeout_s=120,
                       log_dir=os.path.join(log_dir, f"node{node}"))
    try:
        fleet = start_colocated_fleet(cfg, log_dir, local_rank, gpus_per_node=RANKS_PER_NODE)
    except RolloutError as exc:
        return {"error": str(exc)}
    out = {"urls": fleet.urls, "leader": fleet.launcher is not None}
    if rank == 0:
        engine = SGLangEngine(dataclasses.replace(cfg, urls=fleet.urls, colocated=True))
        groups = engine.generate([[1, 2]], len(fleet.urls), SamplingParams(max_new_tokens=2, ignore_eos=True))
        out["samples"] = len(groups[0])
        out["colocated"] = engine.shares_trainer_gpus
        engine.shutdown()
    dist.barrier()
    fleet.shutdown()
    return out


def test_every_node_launches_its_servers_and_every_rank_knows_them(tmp_path):
    results = run_distributed(_fleet_case, 2 * RANKS_PER_NODE, str(tmp_path), -1, timeout_s=240)
    urls = results[0]["urls"]
    assert len(urls) == 4 and len(set(urls)) == 4  # 2 servers on each of 2 nodes
    assert all(r["urls"] == urls for r in results)
    assert [r["leader"] for r in results] == [True, False, True, False]
    assert results[0]["samples"] == 4 and results[0]["colocated"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["node0", "node1"]  # each node's own logs


def test_a_node_that_cannot_start_stops_every_rank(tmp_path):
    results = run_distributed(_fleet_case, 2 * RANKS_PER_NODE, str(tmp_path), 1, timeout_s=240)
    assert all("did not start on 1 node(s)" in r["error"] and "no GPU on node 1" in r["error"] for r in results)
