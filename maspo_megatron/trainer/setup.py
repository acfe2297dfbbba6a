"""Building the pieces of a run: tokenizer, Megatron policy (DDP-wrapped chunks), rollout engine.

Only model/engine construction lives here; the RL loop itself is in loop.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any, List, Optional

import torch

from maspo_megatron.config import Config
from maspo_megatron.rollout.registry import engine_traits


@dataclasses.dataclass
class Policy:
    """The Megatron policy of this rank and what describes it.

    chunks: DDP-wrapped model chunks (one per virtual pipeline stage) on the rank's device;
    config: TransformerConfig; meta: ModelMeta; wmap: WeightMap (HF <-> Megatron table);
    hf_config: the HF config object; attention_backend: how packed rows reach attention
    ("te" / "packed": THD packed_seq_params, "dense": the CPU block mask; models/provider.py).
    """

    chunks: List[torch.nn.Module]
    config: Any
    meta: Any
    wmap: Any
    hf_config: Any
    attention_backend: str = "dense"


def build_tokenizer(cfg: Config):
    """The tiny character tokenizer for `model.hf_config: tiny`, else the HF tokenizer of the model dir."""
    if cfg.model.hf_config == "tiny":
        from maspo_megatron.data import build_tiny_tokenizer

        return build_tiny_tokenizer()
    import transformers

    path = cfg.model.tokenizer or cfg.model.init_from_hf or cfg.model.hf_config
    try:
        return transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model.tokenizer: cannot load a tokenizer from {path!r} ({str(exc).splitlines()[0]})") from None


def resolve_hf_config(cfg: Config, tokenizer) -> Any:
    """The HF config object of the policy ('tiny' is built from model.tiny_* and the tokenizer's vocab)."""
    from maspo_megatron.models.config_builder import resolve_hf_config as resolve

    source = cfg.model.hf_config
    if source == "tiny":
        hf_config = resolve(source, cfg.model, vocab_size=len(tokenizer))
        hf_config.eos_token_id = tokenizer.eos_token_id
        hf_config.pad_token_id = tokenizer.pad_token_id
        return hf_config
    import transformers

    return transformers.AutoConfig.from_pretrained(source)


def build_policy(cfg: Config, dims, tokenizer, *, frozen: bool = False) -> Policy:
    """Megatron GPTModel chunks for this rank's pipeline stage(s), wrapped in Megatron DDP.

    frozen=True: a forward-only copy (the KL reference): no weights loaded (the caller sets them),
    no DDP (no gradient buffer: it would cost 2-4 bytes per parameter), no gradients.

    `calculate_per_token_loss` is on (the loss normalises by the global token count itself, see
    trainer/loss.py) and `finalize_model_grads` reduces gradients over DP x CP after each
    forward/backward. Initial weights: `model.init_from_hf` (HF dir), `model.load` (dist
    checkpoint), or Megatron's random init from `model.seed`. Every chunk is placed on
    `dims.device` before Float16Module and DDP wrap it (as Megatron's own get_model does):
    modules Megatron builds outside its CUDA-aware initialisers (torch norms) start on the CPU.
    """
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.transformer.module import Float16Module

    from maspo_megatron.models import FAMILIES, WeightMap
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import attention_backend, make_model_provider
    from maspo_megatron.parallel.pipeline import apply_pipeline_comm_settings

    hf_config = resolve_hf_config(cfg, tokenizer)
    config, meta = build_model_config(hf_config, cfg.model, cfg.parallel)
    config.calculate_per_token_loss = True
    # Interleaved pipeline: Megatron's unbatched p2p mode (the batched one mixes up activations and
    # gradients at pp = 2; parallel/pipeline.py).
    apply_pipeline_comm_settings(config, cfg.parallel.pp, cfg.parallel.vpp)
    config.init_method_std = getattr(hf_config, "initializer_range", 0.02)
    backend = attention_backend(choice=cfg.model.attention)
    provider = make_model_provider(config, meta, backend=backend)
    # The same model seed on every rank: use_cpu_initialization draws full tensors and slices them.
    torch.manual_seed(cfg.model.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(cfg.model.seed)
    chunks = []
    for vp_stage in range(cfg.parallel.vpp or 1):
        stage = vp_stage if cfg.parallel.vpp else None
        chunks.append(provider(
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            vp_stage=stage).to(dims.device))
    wmap = WeightMap(FAMILIES[meta.family], meta)
    if cfg.model.init_from_hf and not frozen:
        _load_hf_into(chunks, wmap, cfg.model.init_from_hf, dims)
    if cfg.model.dtype != "fp32":
        chunks = [Float16Module(config, chunk) for chunk in chunks]
    if frozen:
        for chunk in chunks:
            chunk.requires_grad_(False)
            chunk.eval()
        return Policy(chunks=chunks, config=config, meta=meta, wmap=wmap, hf_config=hf_config,
                      attention_backend=backend)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=cfg.parallel.distributed_optimizer)
    chunks = [DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=index > 0)
              for index, chunk in enumerate(chunks)]
    config.finalize_model_grads_func = finalize_model_grads
    if cfg.model.load:
        from maspo_megatron.checkpoint.dist_load import load_model_weights

        load_model_weights(chunks, cfg.model.load)
    for chunk in chunks:
        chunk.broadcast_params()  # DP replicas start identical whatever the init path
    return Policy(chunks=chunks, config=config, meta=meta, wmap=wmap, hf_config=hf_config, attention_backend=backend)


def _load_hf_into(chunks, wmap, hf_dir: str, dims) -> None:
    from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
    from maspo_megatron.checkpoint.hf_weights import load_hf_weights

    reader = HFCheckpointReader(hf_dir)
    try:
        for chunk in chunks:
            load_hf_weights(chunk, wmap, reader, dims.tp_rank, dims.tp)  # each rank reads only its TP slice
    finally:
        reader.close()


def start_rollout_fleet(cfg: Config, dims) -> Optional[Any]:
    """Collective: the colocated SGLang servers of EVERY node, each launched by its node's first rank
    (rollout/sglang/fleet.py), or None when the engine runs no SGLang servers (trait `sglang_servers`,
    rollout/registry.py) or they are given by URL.

    Call it before the policy allocates GPU memory: SGLang sizes its static memory from what the
    GPU has free when it starts.
    """
    sglang = cfg.rollout.sglang
    if not engine_traits(cfg.rollout.engine).sglang_servers or sglang.urls:
        return None
    from maspo_megatron.rollout.sglang.fleet import start_colocated_fleet

    model_path = cfg.model.init_from_hf or cfg.model.hf_config
    per_node = sglang.base_gpu_id + sglang.num_servers * sglang.tp_size * sglang.dp_size
    # Without CUDA (CPU tests with a stand-in server) there are no GPU ids to run out of.
    gpus_per_node = torch.cuda.device_count() if dims.device.type == "cuda" else per_node
    return start_colocated_fleet(sglang, model_path, dims.local_rank, gpus_per_node)


def build_engine_on_driver(cfg: Config, policy: Policy, dims, tokenizer, fleet=None) -> Optional[Any]:
    """The rollout engine `rollout.engine` names, on global rank 0 only (None elsewhere).

    Every engine's factory (rollout/registry.py) gets the same facts and takes what it needs: the
    local engine builds a fresh HF model of the policy's architecture on the rank's device (its
    weights are set by the first weight sync, so engine and trainer start from the same
    parameters); server engines load `model_path`.
    """
    if dims.rank != 0:
        return None
    from maspo_megatron.rollout import build_engine

    rollout_cfg = cfg.rollout
    if fleet is not None:  # the servers every node launched (start_rollout_fleet), colocated with the trainer
        sglang = dataclasses.replace(rollout_cfg.sglang, urls=list(fleet.urls), colocated=True)
        rollout_cfg = dataclasses.replace(rollout_cfg, sglang=sglang)
    return build_engine(rollout_cfg, model_path=cfg.model.init_from_hf or cfg.model.hf_config,
                        hf_config=policy.hf_config, device=dims.device, tokenizer=tokenizer,
                        init_seed=cfg.model.seed, weight_version=0)
