"""ONE declarative table per model family: Hugging Face names/layouts <-> Megatron names/layouts.

Each `Rule` says: this Megatron tensor (named as in the dist checkpoint, i.e. Transformer-Engine
naming, per layer without the layer index) is made of these HF tensors, with this layout, and
is TP-sharded along this dim. The checkpoint converters (tools/) and the live weight sync use
the same rules through `WeightMap` (weight_map.py). Adding a family is adding a `Family` here.

`{i}` in an HF name is the global layer index. Conditions (`when`) switch rules on per model:
`qkv_bias` (Qwen2), `qk_norm` (Qwen3), `untied` (separate lm_head / output_layer).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

LAYOUTS = ("copy", "qkv", "gate_up", "vocab")


@dataclasses.dataclass(frozen=True)
class Rule:
    megatron: str  # dist-checkpoint name; per-layer rules are relative to "decoder.layers.{i}."
    hf: tuple[str, ...]  # HF names in the order the layout expects (q, k, v) / (gate, up)
    layout: str  # one of LAYOUTS
    tp_dim: Optional[int]  # dim of the full Megatron tensor split over TP ranks; None = replicated
    per_layer: bool = True
    when: Optional[str] = None  # feature flag that must be true for the rule to apply

    @property
    def tp_glu(self) -> bool:
        """True when each TP shard is cat(gate[r], up[r]) (see layouts.gather_tp)."""
        return self.layout == "gate_up"


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]  # HF `model_type` values this table serves
    rules: tuple[Rule, ...]
    # hf config dict -> feature flags (qkv_bias, qk_norm); raises ValueError naming the key if unsupported
    features: Callable[[Mapping[str, Any]], dict]


_LAYER = "model.layers.{i}."

_EMBEDDING = Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", 0, per_layer=False)
_FINAL_NORM = Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy", None, per_layer=False)
_OUTPUT = Rule("output_layer.weight", ("lm_head.weight",), "vocab", 0, per_layer=False, when="untied")

_INPUT_NORM = Rule("self_attention.linear_qkv.layer_norm_weight", (_LAYER + "input_layernorm.weight",), "copy", None)
_QKV = Rule(
    "self_attention.linear_qkv.weight",
    tuple(_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
    "qkv",
    0,
)
_QKV_BIAS = Rule(
    "self_attention.linear_qkv.bias", tuple(_LAYER + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv", 0, when="qkv_bias"
)
_Q_NORM = Rule("self_attention.q_layernorm.weight", (_LAYER + "self_attn.q_norm.weight",), "copy", None, when="qk_norm")
_K_NORM = Rule("self_attention.k_layernorm.weight", (_LAYER + "self_attn.k_norm.weight",), "copy", None, when="qk_norm")
_PROJ = Rule("self_attention.linear_proj.weight", (_LAYER + "self_attn.o_proj.weight",), "copy", 1)
_MLP_NORM = Rule("mlp.linear_fc1.layer_norm_weight", (_LAYER + "post_attention_layernorm.weight",), "copy", None)
_FC1 = Rule("mlp.linear_fc1.weight", (_LAYER + "mlp.gate_proj.weight", _LAYER + "mlp.up_proj.weight"), "gate_up", 0)
_FC2 = Rule("mlp.linear_fc2.weight", (_LAYER + "mlp.down_proj.weight",), "copy", 1)


def _no_extra_biases(family: str) -> Callable[[Mapping[str, Any]], dict]:
    def features(cfg: Mapping[str, Any]) -> dict:
        for key in ("attention_bias", "mlp_bias"):
            if cfg.get(key):
                raise ValueError(f"{key}: true is not supported for the {family} family (Megatron would add biases everywhere)")
        return {"qkv_bias": False, "qk_norm": False}

    return features


def _qwen2_features(cfg: Mapping[str, Any]) -> dict:
    return {"qkv_bias": True, "qk_norm": False}


def _qwen3_features(cfg: Mapping[str, Any]) -> dict:
    if cfg.get("attention_bias"):
        raise ValueError("attention_bias: true is not supported for the qwen3 family")
    return {"qkv_bias": False, "qk_norm": True}


LLAMA = Family(
    "llama", ("llama",), (_EMBEDDING, _INPUT_NORM, _QKV, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT),
    _no_extra_biases("llama"),
)
MISTRAL = Family(
    "mistral", ("mistral",), (_EMBEDDING, _INPUT_NORM, _QKV, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT),
    _no_extra_biases("mistral"),
)
QWEN2 = Family(
    "qwen2", ("qwen2",), (_EMBEDDING, _INPUT_NORM, _QKV, _QKV_BIAS, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT),
    _qwen2_features,
)
QWEN3 = Family(
    "qwen3", ("qwen3",),
    (_EMBEDDING, _INPUT_NORM, _QKV, _Q_NORM, _K_NORM, _PROJ, _MLP_NORM, _FC1, _FC2, _FINAL_NORM, _OUTPUT),
    _qwen3_features,
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3)}

# Megatron module names that differ between the local spec (separate norm modules) and the
# Transformer-Engine spec (norm fused into the next linear); the checkpoint uses the TE names
# (the local spec maps its keys the same way in `sharded_state_dict_keys_map`).
LOCAL_TO_TE_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def get_family(hf_config: Any) -> Family:
    """The family table for an HF config (PretrainedConfig, dict, or anything with `model_type`)."""
    model_type = hf_config.get("model_type") if isinstance(hf_config, Mapping) else getattr(hf_config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"model_type: {model_type!r} is not a supported family (supported: {', '.join(known)})")
