"""`ModelMeta`: the architecture facts of an HF config that both the model builder and the
weight mapping need (shapes, features, vocab padding), read once with clear errors."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Optional

from maspo_megatron.models.families import Family, get_family
from maspo_megatron.models.layouts import pad_vocab_size

# Megatron's RotaryEmbedding applies Llama-3 scaling with these fixed constants (only the factor
# is a parameter), so configs with other values are refused instead of silently diverging.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclasses.dataclass(frozen=True)
class ModelMeta:
    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int  # the HF vocab (rows of embed_tokens)
    padded_vocab_size: int  # rows of Megatron's embedding / output layer (multiple of 128 x tp)
    tied_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    norm_eps: float
    rope_theta: float
    rope_scaling_factor: Optional[float]  # Llama-3 rope scaling factor; None = no scaling
    max_position_embeddings: int
    sliding_window: Optional[int]

    @property
    def attention_window(self) -> Optional[tuple[int, int]]:
        """Megatron's `window_size` (left, right), both inclusive; None when the window spans every position.

        HF attends to keys with q - k < sliding_window, i.e. left = sliding_window - 1, right = 0.
        """
        if self.sliding_window is None or self.sliding_window >= self.max_position_embeddings:
            return None
        return (self.sliding_window - 1, 0)

    def flags(self) -> dict:
        """Feature flags used by the rules' `when` conditions."""
        return {"qkv_bias": self.qkv_bias, "qk_norm": self.qk_norm, "untied": not self.tied_embeddings}


def load_hf_config_dict(source: Any) -> dict:
    """An HF config as a plain dict, from a PretrainedConfig, a dict, a model dir or a config.json path."""
    if isinstance(source, Mapping):
        return dict(source)
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return source.to_dict()
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: HF config.json not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if cfg.get(key) is None:
        raise ValueError(f"{key}: missing from the HF config (model_type {cfg.get('model_type')!r})")
    return cfg[key]


def _rope(cfg: Mapping[str, Any]) -> tuple[float, Optional[float]]:
    # transformers >= 5 keeps theta and scaling in `rope_parameters`; older configs use
    # `rope_theta` + `rope_scaling`.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = params if params.get("rope_type", "default") != "default" else dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type in ("default", None):
        return theta, None
    if rope_type != "llama3":
        raise ValueError(f"rope_scaling.rope_type: {rope_type!r} is not supported (supported: default, llama3)")
    for key, expected in _LLAMA3_FIXED.items():
        if key in scaling and float(scaling[key]) != expected:
            raise ValueError(f"rope_scaling.{key}: {scaling[key]} is not supported (Megatron-Core fixes it at {expected})")
    return theta, float(_require(scaling, "factor"))


def model_meta(hf_config: Any, tp: int = 1, vocab_divisible_by: int = 128) -> ModelMeta:
    """Reads an HF config (see `load_hf_config_dict`) into `ModelMeta`; vocab padded for `tp`."""
    cfg = load_hf_config_dict(hf_config)
    family: Family = get_family(cfg)
    features = family.features(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act: {act!r} is not supported (SwiGLU families use 'silu')")
    hidden = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise ValueError(f"num_key_value_heads: {kv_heads} does not divide num_attention_heads ({heads})")
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    vocab = int(_require(cfg, "vocab_size"))
    theta, factor = _rope(cfg)
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return ModelMeta(
        family=family.name,
        num_layers=int(_require(cfg, "num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(_require(cfg, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        padded_vocab_size=pad_vocab_size(vocab, tp, vocab_divisible_by),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=features["qkv_bias"],
        qk_norm=features["qk_norm"],
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling_factor=factor,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        sliding_window=int(sliding) if sliding else None,
    )
