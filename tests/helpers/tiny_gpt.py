"""A tiny Megatron-Core GPTModel (local, non-Transformer-Engine layer spec) for CPU tests.

Qwen2-shaped: RMSNorm, SwiGLU MLP, RoPE, grouped-query attention, QKV bias, untied output layer.
Weights are created on CPU from the CPU RNG over the FULL tensor and then sliced
(`use_cpu_initialization`), so the same seed gives the same model at every TP size; across PP
sizes use `full_state_dict` / `load_full_state_dict` to move one reference model around.

    dims = init_distributed(ParallelConfig(tp=2, pp=2), seed=1)
    chunks = build_tiny_gpt(dims)            # list of model chunks (one per virtual stage)
    load_full_state_dict(chunks, full_sd)    # full (TP1/PP1) tensors -> this rank's shards
"""
from __future__ import annotations

import re

import torch

from maspo_megatron.models.wrappers import unwrap

TINY_VOCAB = 96  # divisible by 4 (TP) and 32 (Megatron's padding multiple is not applied here)


def tiny_transformer_config(dims, *, num_layers: int = 4, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                            ffn: int = 64, calculate_per_token_loss: bool = True, dtype=torch.float32):
    from megatron.core.transformer import TransformerConfig

    from maspo_megatron.parallel.pipeline import pipeline_comm_settings

    return TransformerConfig(
        num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, num_query_groups=kv_heads,
        ffn_hidden_size=ffn, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, add_qkv_bias=True,
        hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=dims.tp,
        pipeline_model_parallel_size=dims.pp, virtual_pipeline_model_parallel_size=dims.vpp,
        context_parallel_size=dims.cp, sequence_parallel=dims.sequence_parallel,
        use_cpu_initialization=True, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, calculate_per_token_loss=calculate_per_token_loss,
        init_method_std=0.05, **pipeline_comm_settings(dims.pp, dims.vpp),
    )


def build_tiny_gpt(dims, *, vocab_size: int = TINY_VOCAB, max_seq_len: int = 256, transformer_engine: bool = False,
                   **config_kwargs) -> list:
    """One GPTModel chunk per virtual pipeline stage of this rank (a list of length vpp or 1).

    transformer_engine=True uses the TE layer spec (GPU tests: context parallel, THD packing).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    config = tiny_transformer_config(dims, **config_kwargs)
    if transformer_engine:
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    chunks = []
    for vp_stage in range(dims.vpp or 1):
        stage = vp_stage if dims.vpp else None
        chunks.append(GPTModel(
            config=config, transformer_layer_spec=spec, vocab_size=vocab_size, max_sequence_length=max_seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True, share_embeddings_and_output_weights=False,
            position_embedding_type="rope", vp_stage=stage))
    return chunks


def wrap_ddp(chunks: list, *, distributed_optimizer: bool, bucket_size: int | None = None) -> list:
    """Megatron DistributedDataParallel around each chunk (grads reduced over DP x CP)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=distributed_optimizer,
        bucket_size=bucket_size)
    return [DistributedDataParallel(chunk.config, ddp_config, chunk,
                                    disable_bucketing=(index > 0)) for index, chunk in enumerate(chunks)]


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def _global_name(chunk, local_name: str) -> str:
    """Local parameter name -> name in the TP1/PP1 model (layer indices made global)."""
    match = _LAYER.match(local_name)
    if not match:
        return local_name
    layer = chunk.decoder.layers[int(match.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}." + local_name[match.end():]


def _tp_slice(name: str, param, full: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """The slice of a full tensor that `param` holds on this TP rank."""
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return full
    dim = param.partition_dim
    if name.endswith("linear_fc1.weight"):
        # SwiGLU fc1 is [gate; up]: each rank holds [gate_r; up_r].
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim=0)[tp_rank], up.chunk(tp, dim=0)[tp_rank]], dim=0)
    return full.chunk(tp, dim=dim)[tp_rank]


def named_local_params(chunks: list):
    """Yields (global_name, local_param) over all chunks of this rank."""
    for chunk in chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            yield _global_name(module, name), param


def load_full_state_dict(chunks: list, full_state: dict[str, torch.Tensor], tp_rank: int, tp: int) -> None:
    """Copies full (TP1/PP1) tensors into this rank's shards, by global name."""
    with torch.no_grad():
        for name, param in named_local_params(chunks):
            if name not in full_state:
                raise KeyError(f"load_full_state_dict: {name} missing from the full state dict")
            param.copy_(_tp_slice(name, param, full_state[name], tp_rank, tp))


def local_slice_of(chunks: list, full: dict[str, torch.Tensor], tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """{global_name: this rank's slice of full[global_name]}, e.g. to compare gradients per shard."""
    return {name: _tp_slice(name, param, full[name], tp_rank, tp) for name, param in named_local_params(chunks)}


def local_grads(chunks: list) -> dict[str, torch.Tensor]:
    """{global_name: gradient} of this rank's params (Megatron DDP keeps it in `main_grad`)."""
    out = {}
    for name, param in named_local_params(chunks):
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        out[name] = None if grad is None else grad.detach().clone().float()
    return out
