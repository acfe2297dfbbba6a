"""Per-rank body for the multi-process conversion test (imported by file path in each rank)."""
from __future__ import annotations


def convert_case(hf_dir: str, out_dir: str, tp: int, pp: int) -> str:
    from maspo_megatron.models.convert import hf_to_megatron

    return str(hf_to_megatron(hf_dir, out_dir, tp=tp, pp=pp, progress=False))
