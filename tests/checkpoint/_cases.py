"""Multi-process cases for tests/checkpoint (imported by file path in each rank; see tests/helpers/multiproc.py)."""
from __future__ import annotations

import torch


def forward_logits(model, ids: torch.Tensor, seq_len: int):
    """Forward-only pass through the pipeline; returns the full-vocab logits on the last stage, else None.

    logits[B, S, Vp] (TP-gathered; padding columns included)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    stash = []

    def forward_step(data_iterator, chunk):
        tokens = next(data_iterator)
        positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
        output = chunk(tokens, positions, None)

        def loss_func(output_tensor):
            stash.append(output_tensor.detach())
            return output_tensor.sum() * 0.0, {}

        return output, loss_func

    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([ids]), model=[model], num_microbatches=1,
            seq_length=seq_len, micro_batch_size=ids.shape[0], forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    local = stash[0]
    tp_group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(parts, local.contiguous(), group=tp_group)
    return torch.cat(parts, dim=-1)


def parity_case(cases: list[dict], layouts: list[tuple[int, int]]) -> dict:
    """For each (tp, pp) layout and case: build the Megatron model, load the converted checkpoint,
    run `ids`, and return {(name, tp, pp): logits[..., :V]} from last-stage, TP-rank-0 ranks."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from maspo_megatron.checkpoint.dist_load import load_model_weights
    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel.state import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    out = {}
    for tp, pp in layouts:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model_parallel_cuda_manual_seed(1)
        for case in cases:
            if tp not in case.get("tps", (tp,)):
                continue  # e.g. one KV group cannot be split over TP ranks
            config, meta = build_model_config(case["hf_config"], ModelConfig(), ParallelConfig(tp=tp, pp=pp))
            model = gpt_model_provider(config, meta, pre_process=ps.is_pipeline_first_stage(),
                                       post_process=ps.is_pipeline_last_stage()).eval()
            load_model_weights([model], case["ckpt"])
            logits = forward_logits(model, case["ids"], case["ids"].shape[1])
            if case.get("save_to") and (tp, pp) == case.get("save_at"):
                # a checkpoint written by Megatron itself, for the Megatron -> HF converter
                from megatron.core import dist_checkpointing

                dist_checkpointing.save({"model": model.sharded_state_dict()}, case["save_to"])
            if logits is not None and ps.get_tensor_model_parallel_rank() == 0:
                out[(case["name"], tp, pp)] = logits[..., : meta.vocab_size].clone()
            if case.get("direct"):
                _direct_hf_round(case, config, meta, tp, pp, out)
    return out


def _direct_hf_round(case: dict, config, meta, tp: int, pp: int, out: dict) -> None:
    """`load_hf_weights` straight from the HF dir (model.init_from_hf), then `export_hf_weights`
    back (the live weight-sync path): logits under (name + '@direct', tp, pp), exported tensors
    under ('export', name, tp, pp)."""
    from megatron.core import parallel_state as ps

    from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
    from maspo_megatron.checkpoint.hf_weights import export_hf_weights, load_hf_weights
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.provider import gpt_model_provider

    model = gpt_model_provider(config, meta, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage()).eval()
    wmap = WeightMap.from_hf_config(case["hf_config"], tp=tp)
    tp_rank = ps.get_tensor_model_parallel_rank()
    load_hf_weights(model, wmap, HFCheckpointReader(case["hf_config"]).get, tp_rank, tp)
    logits = forward_logits(model, case["ids"], case["ids"].shape[1])
    if logits is not None and tp_rank == 0:
        out[(case["name"] + "@direct", tp, pp)] = logits[..., : meta.vocab_size].clone()

    def gather(shard, name):
        parts = [torch.empty_like(shard) for _ in range(tp)]
        torch.distributed.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
        return parts

    exported = dict(export_hf_weights(model, wmap, gather))
    if tp_rank == 0 and ps.get_data_parallel_rank() == 0:
        out[("export", case["name"], tp, pp, ps.get_pipeline_model_parallel_rank())] = exported
