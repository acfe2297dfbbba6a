"""Parallel building blocks for Megatron-Core: the device decision, layout, vocab-parallel math.

Knows collectives and layouts, never RL (see ../../docs/parallel.md).
"""
from maspo_megatron.parallel.context import merge_from_cp, packed_zigzag_indices, split_for_cp, zigzag_indices
from maspo_megatron.parallel.metrics import reduce_sums
from maspo_megatron.parallel.state import (
    ParallelDims,
    check_layout,
    destroy_distributed,
    get_parallel_dims,
    init_distributed,
)
from maspo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy

__all__ = [
    "ParallelDims", "check_layout", "destroy_distributed",
    "get_parallel_dims", "init_distributed", "merge_from_cp", "packed_zigzag_indices", "reduce_sums",
    "split_for_cp", "vocab_parallel_logprobs_entropy", "zigzag_indices",
]
