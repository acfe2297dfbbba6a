"""Megatron-Core `GPTModel` providers for the SwiGLU families (one per PP stage / virtual stage).

    config, meta = build_model_config(hf_dir, model_cfg, parallel_cfg)
    provider = make_model_provider(config, meta)      # (pre_process, post_process, vp_stage=None) -> GPTModel
    model = provider(pre_process=is_first_stage, post_process=is_last_stage)

Layer spec: Transformer Engine when it imports AND CUDA is present, Megatron's local spec otherwise.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from maspo_megatron.models.fp8 import transformer_engine_usable
from maspo_megatron.models.meta import ModelMeta


def layer_spec(meta: ModelMeta, use_te: Optional[bool] = None) -> ModuleSpec:
    """The transformer layer spec: TE (fused norm+linear) on GPU with TE, torch/local otherwise."""
    if use_te is None:
        use_te = transformer_engine_usable()
    if use_te:
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=meta.qk_norm)
    return get_gpt_layer_local_spec(qk_layernorm=meta.qk_norm, normalization="RMSNorm")


def attention_backend(use_te: Optional[bool] = None) -> str:
    """How packed rows reach attention with the layer spec `layer_spec` picks (one decision):
    "te" = Transformer Engine, THD packed_seq_params and no mask; "dense" = the local spec with
    the block-diagonal [R, 1, S, S] mask (CPU)."""
    if use_te is None:
        use_te = transformer_engine_usable()
    return "te" if use_te else "dense"


def gpt_model_provider(
    config: TransformerConfig,
    meta: ModelMeta,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
) -> GPTModel:
    """One GPTModel chunk (embedding on the first stage, output layer on the last)."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(meta, use_te),
        vocab_size=meta.padded_vocab_size,
        max_sequence_length=meta.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=meta.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=meta.rope_theta,
        rope_scaling=meta.rope_scaling_factor is not None,
        rope_scaling_factor=meta.rope_scaling_factor or 8.0,
        vp_stage=vp_stage,
    )


def make_model_provider(config: TransformerConfig, meta: ModelMeta, use_te: Optional[bool] = None) -> Callable[..., GPTModel]:
    """A `(pre_process, post_process, vp_stage=None) -> GPTModel` callable for pipeline builders."""
    return functools.partial(gpt_model_provider, config, meta, use_te=use_te)
