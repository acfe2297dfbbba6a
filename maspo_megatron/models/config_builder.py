"""HF config -> Megatron-Core `TransformerConfig` (+ the `ModelMeta` the provider and mapping need)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer import TransformerConfig

from maspo_megatron.config.model import ModelConfig
from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.models.fp8 import transformer_engine_usable, validate_fp8
from maspo_megatron.models.meta import ModelMeta, model_meta
from maspo_megatron.models.provider import attention_backend, check_attention_parallel

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_hf_config(hf_config_or_dir: Any, model_cfg: ModelConfig, vocab_size: Optional[int] = None) -> Any:
    """'tiny' -> the built-in tiny Qwen2 config (needs `vocab_size` from the tokenizer); anything else as is."""
    if isinstance(hf_config_or_dir, str) and hf_config_or_dir == "tiny":
        if vocab_size is None:
            raise ValueError("model.hf_config: 'tiny' needs vocab_size (from the tokenizer)")
        from maspo_megatron.models.tiny import tiny_hf_config

        return tiny_hf_config(model_cfg, vocab_size)
    return hf_config_or_dir


def check_parallel_fit(meta: ModelMeta, parallel_cfg: ParallelConfig) -> None:
    """One-line errors when the model cannot be split at this TP/PP."""
    tp, pp, vpp = parallel_cfg.tp, parallel_cfg.pp, parallel_cfg.vpp or 1
    if meta.num_heads % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide num_attention_heads ({meta.num_heads})")
    if meta.num_kv_heads % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide num_key_value_heads ({meta.num_kv_heads})")
    if meta.ffn_hidden_size % tp:
        raise ValueError(f"parallel.tp: {tp} does not divide intermediate_size ({meta.ffn_hidden_size})")
    if meta.num_layers % (pp * vpp):
        raise ValueError(f"parallel.pp: num_hidden_layers ({meta.num_layers}) is not divisible by pp x vpp ({pp} x {vpp})")


def build_model_config(
    hf_config_or_dir: Any,
    model_cfg: ModelConfig,
    parallel_cfg: ParallelConfig,
    vocab_size: Optional[int] = None,
) -> tuple[TransformerConfig, ModelMeta]:
    """(TransformerConfig, ModelMeta) for an HF config / dir / config.json, or 'tiny'.

    The vocab is padded to a multiple of model_cfg.vocab_divisible_by x TP (meta.padded_vocab_size);
    logits past meta.vocab_size are padding and must be masked by consumers.
    """
    hf_config = resolve_hf_config(hf_config_or_dir, model_cfg, vocab_size)
    meta = model_meta(hf_config, tp=parallel_cfg.tp, vocab_divisible_by=model_cfg.vocab_divisible_by)
    check_parallel_fit(meta, parallel_cfg)
    validate_fp8(model_cfg.fp8)
    on_gpu = torch.cuda.is_available()
    te = transformer_engine_usable()
    check_attention_parallel(parallel_cfg, attention_backend(te, model_cfg.attention))
    params_dtype = _DTYPES[model_cfg.dtype]
    recompute = {}
    if model_cfg.recompute == "full":
        recompute = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    elif model_cfg.recompute == "selective":
        recompute = {"recompute_granularity": "selective"}
    config = TransformerConfig(
        num_layers=meta.num_layers,
        hidden_size=meta.hidden_size,
        ffn_hidden_size=meta.ffn_hidden_size,
        num_attention_heads=meta.num_heads,
        num_query_groups=meta.num_kv_heads,
        kv_channels=meta.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=meta.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=meta.qkv_bias,
        qk_layernorm=meta.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        window_size=meta.attention_window,
        tensor_model_parallel_size=parallel_cfg.tp,
        pipeline_model_parallel_size=parallel_cfg.pp,
        virtual_pipeline_model_parallel_size=parallel_cfg.vpp,
        context_parallel_size=parallel_cfg.cp,
        sequence_parallel=parallel_cfg.sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=model_cfg.dtype == "bf16",
        fp16=model_cfg.dtype == "fp16",
        fp8="hybrid" if model_cfg.fp8 else None,
        fp8_recipe=model_cfg.fp8 or "delayed",
        use_cpu_initialization=not on_gpu,
        # fused kernels need CUDA (and apex/TE); keep them on where they can run
        bias_activation_fusion=False,
        bias_dropout_fusion=te,
        masked_softmax_fusion=te,
        apply_rope_fusion=te,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        **recompute,
    )
    return config, meta
