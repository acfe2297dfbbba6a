"""Per-rank body for the multi-process conversion test (imported by file path in each rank)."""
from __future__ import annotations


def convert_case(hf_dir: str, meg_dir: str, back_dir: str, tp: int, pp: int, max_shard_bytes: int) -> str:
    """HF -> Megatron, then Megatron -> HF, both split across the launched processes."""
    from maspo_megatron.models.convert import hf_to_megatron, megatron_to_hf

    hf_to_megatron(hf_dir, meg_dir, tp=tp, pp=pp, progress=False)
    return str(megatron_to_hf(meg_dir, back_dir, max_shard_bytes=max_shard_bytes, progress=False))
