"""Megatron-Core `GPTModel` providers for the SwiGLU families (one per PP stage / virtual stage).

    config, meta = build_model_config(hf_dir, model_cfg, parallel_cfg)
    provider = make_model_provider(config, meta)      # (pre_process, post_process, vp_stage=None) -> GPTModel
    model = provider(pre_process=is_first_stage, post_process=is_last_stage)

Layer spec and attention backend: ONE decision, `attention_backend(use_te)`:

| backend  | when                  | spec                                       | model input of a packed micro-batch |
|----------|-----------------------|--------------------------------------------|-------------------------------------|
| "te"     | CUDA + TE imports     | Megatron's TE spec                         | tokens/position_ids as ONE row [1, T], `attention_mask=None`, `packed_seq_params=` THD (`thd_packed_seq_params(cu_seqlens)`) |
| "packed" | CUDA, no TE           | local spec + `PackedDotProductAttention`   | the same as "te"                    |
| "dense"  | no CUDA (CPU tests)   | Megatron's local spec (the packed attention for sliding-window models) | rows [R, S] with the block-diagonal causal mask [R, 1, S, S] (`PackedMicroBatch.attention_mask()`), no packed_seq_params |

Sequence and context parallel need TE on a GPU: `check_attention_parallel` refuses them otherwise.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Literal, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from maspo_megatron.config.parallel import ParallelConfig
from maspo_megatron.models.fp8 import transformer_engine_usable
from maspo_megatron.models.meta import ModelMeta
from maspo_megatron.models.packed_attention import PackedDotProductAttention

AttentionBackend = Literal["te", "packed", "dense"]


def attention_backend(use_te: Optional[bool] = None, choice: str = "auto") -> AttentionBackend:
    """"te" (CUDA + Transformer Engine), "packed" (CUDA without TE) or "dense" (CPU); table above.

    choice: `model.attention` ("auto" = the first of te / packed / dense this machine can run;
    "packed" also runs on the CPU, which is how CPU tests check it; "dense" is refused on a GPU,
    where its [R, 1, S, S] mask costs O(S^2) per row and TE ignores it).
    use_te: None = TE when it is usable here; False forces the torch paths; True asserts TE.
    """
    if use_te is None:
        use_te = transformer_engine_usable()
    if choice == "auto":
        if use_te:
            return "te"
        return "packed" if torch.cuda.is_available() else "dense"
    if choice == "te" and not use_te:
        raise ValueError("model.attention: 'te' needs Transformer Engine on a CUDA GPU, which is not usable here")
    if choice == "dense" and torch.cuda.is_available():
        raise ValueError("model.attention: 'dense' is the CPU fallback (an O(S^2) mask per row); on a GPU use "
                         "'packed' or 'te'")
    if choice not in ("te", "packed", "dense"):
        raise ValueError(f"model.attention: {choice!r} is not one of 'auto', 'te', 'packed', 'dense'")
    return choice


def check_attention_parallel(parallel_cfg: ParallelConfig, backend: AttentionBackend) -> None:
    """One-line ValueError when the layout needs Transformer Engine's attention and TE is absent.

    Context parallel splits attention across ranks: only TE implements it (both torch backends).
    Sequence parallel on the GPU needs TE's norms (Megatron's torch norm wrapper refuses it); on
    the CPU the shim provides an SP-aware norm, so the dense CPU path keeps it for tests.
    """
    if backend == "te":
        return
    if parallel_cfg.cp > 1:
        raise ValueError(f"parallel.cp: {parallel_cfg.cp} needs Transformer Engine (context-parallel attention); "
                         "set parallel.cp: 1 or install TE")
    if backend == "packed" and parallel_cfg.sequence_parallel:
        raise ValueError("parallel.sequence_parallel: needs Transformer Engine on a GPU (torch norms refuse it); "
                         "set it to false or install TE")


def packed_layer_spec(meta: ModelMeta) -> ModuleSpec:
    """The local spec (torch RMSNorm: fused on CUDA where torch has the kernel) with packed-row attention."""
    spec = get_gpt_layer_local_spec(qk_layernorm=meta.qk_norm, normalization="RMSNorm")
    attention = spec.submodules.self_attention
    submodules = dataclasses.replace(attention.submodules, core_attention=PackedDotProductAttention)
    self_attention = dataclasses.replace(attention, submodules=submodules)
    return dataclasses.replace(spec, submodules=dataclasses.replace(spec.submodules, self_attention=self_attention))


def layer_spec(meta: ModelMeta, use_te: Optional[bool] = None, backend: Optional[AttentionBackend] = None) -> ModuleSpec:
    """The layer spec of `backend` (default `attention_backend(use_te)`): TE, packed (local + ours) or local.

    backend="packed" also runs on the CPU (SDPA per sample): that is how CPU tests check it.
    """
    backend = backend or attention_backend(use_te)
    if backend not in ("te", "packed", "dense"):
        raise ValueError(f"layer_spec: backend {backend!r} is not one of 'te', 'packed', 'dense'")
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=meta.qk_norm)
    if backend == "packed" or meta.attention_window is not None:
        # dense + sliding window: Megatron's local softmax REPLACES a given mask by its window mask
        # (fusions/fused_softmax.py), letting packed samples see each other; the packed attention's
        # dense-mask path applies both
        return packed_layer_spec(meta)
    return get_gpt_layer_local_spec(qk_layernorm=meta.qk_norm, normalization="RMSNorm")


def gpt_model_provider(
    config: TransformerConfig,
    meta: ModelMeta,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    use_te: Optional[bool] = None,
    backend: Optional[AttentionBackend] = None,
) -> GPTModel:
    """One GPTModel chunk (embedding on the first stage, output layer on the last); `layer_spec` args."""
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(meta, use_te, backend),
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


def make_model_provider(config: TransformerConfig, meta: ModelMeta, use_te: Optional[bool] = None,
                        backend: Optional[AttentionBackend] = None) -> Callable[..., GPTModel]:
    """A `(pre_process, post_process, vp_stage=None) -> GPTModel` callable for pipeline builders."""
    return functools.partial(gpt_model_provider, config, meta, use_te=use_te, backend=backend)
