"""Per-rank body for the multi-process conversion test (imported by file path in each rank)."""
from __future__ import annotations


def convert_case(hf_dir: str, meg_dir: str, back_dir: str, driver_dir: str, tp: int, pp: int, max_shard_bytes: int) -> str:
    """HF -> Megatron and Megatron -> HF split across the launched processes; then, inside an
    already running process group, rank 0 alone converts back (as the trainer's driver does)."""
    import os

    import torch.distributed as dist

    from maspo_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf

    # Each phase rendezvouses on its own port: re-creating a group on the port whose store rank 0
    # has just closed races (a peer can reach the closing store and fail with "got 0 bytes").
    base_port = int(os.environ["MASTER_PORT"])
    hf_to_megatron(hf_dir, meg_dir, tp=tp, pp=pp, progress=False)
    os.environ["MASTER_PORT"] = str(base_port + 1)
    megatron_to_hf(meg_dir, back_dir, max_shard_bytes=max_shard_bytes, progress=False)
    os.environ["MASTER_PORT"] = str(base_port + 2)
    dist.init_process_group("gloo")
    if dist.get_rank() == 0:
        megatron_to_hf(meg_dir, driver_dir, progress=False)
    dist.barrier()
    dist.destroy_process_group()
    return "ok"
