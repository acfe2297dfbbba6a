"""Colocated servers on EVERY node of the job: each node's first rank launches that node's servers
(`plan_servers`: `num_servers` per node, node-local GPU ids), every rank learns every URL, and the
driver's engine talks to all of them (memory handover, weight sync, generation).

    fleet = start_colocated_fleet(cfg.rollout.sglang, model_path, local_rank, gpus_per_node)  # every rank
    engine = SGLangEngine(dataclasses.replace(cfg.rollout.sglang, urls=fleet.urls, colocated=True)) if rank == 0
    ...
    fleet.shutdown()                                                                            # every rank

Call it before Megatron allocates (SGLang sizes its static memory from what the GPU has free when it
starts). Collective over the default group; a node whose servers fail to start makes every rank raise
with that node's error (nobody waits for a fleet that will not come).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch.distributed as dist

from maspo_megatron.rollout.sglang.launcher import ServerLauncher, plan_servers
from maspo_megatron.rollout.types import RolloutError


@dataclasses.dataclass
class Fleet:
    """urls: every server of every node, node-major; launcher: this process's (node leaders only)."""

    urls: list[str]
    launcher: Optional[ServerLauncher] = None

    def shutdown(self) -> None:
        if self.launcher is not None:
            self.launcher.shutdown()
            self.launcher = None


def start_colocated_fleet(cfg, model_path: str, local_rank: int, gpus_per_node: int) -> Fleet:
    """Every rank calls it; ranks with `local_rank == 0` launch their node's servers. `cfg`: SGLangConfig
    (its `host` must be the node's cluster interface when the job has several nodes)."""
    plan_servers(cfg, 1, gpus_per_node)  # refuses a plan past the node before anything starts
    launcher, urls, error = None, [], None
    if local_rank == 0:
        try:
            launcher = ServerLauncher(cfg, model_path)
            urls, _ = launcher.launch()
        except (RolloutError, OSError, ValueError) as exc:
            launcher, error = None, f"rank {dist.get_rank()}: {exc}"
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (urls, error))
    errors = [e for _, e in gathered if e is not None]
    if errors:
        if launcher is not None:
            launcher.shutdown()
        raise RolloutError(f"colocated SGLang fleet did not start on {len(errors)} node(s): {errors[0]}")
    return Fleet([url for node_urls, _ in gathered for url in node_urls], launcher)
