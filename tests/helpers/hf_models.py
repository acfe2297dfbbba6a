"""Tiny `transformers` models built offline from configs, one per test variant.

Variants cover the four families, tied and untied embeddings, vocab sizes that need padding,
GQA with one KV group, several groups and plain MHA, a head_dim that is not hidden/heads, and
Llama-3 RoPE scaling.
"""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

_BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)

VARIANTS = {
    # name: (config class, overrides)
    "qwen2": (transformers.Qwen2Config, dict(vocab_size=300, num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen3": (transformers.Qwen3Config, dict(vocab_size=261, num_key_value_heads=2, head_dim=24, tie_word_embeddings=True)),
    "llama": (transformers.LlamaConfig, dict(
        vocab_size=250, num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=16384,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral": (transformers.MistralConfig, dict(vocab_size=320, num_key_value_heads=2, tie_word_embeddings=False)),
    # one KV group: TP must stay 1 (Megatron splits KV groups across TP ranks)
    "qwen2_gqa1": (transformers.Qwen2Config, dict(vocab_size=256, num_key_value_heads=1, tie_word_embeddings=True)),
}


def hf_config(name: str) -> transformers.PretrainedConfig:
    cls, overrides = VARIANTS[name]
    return cls(**{**_BASE, **overrides})


def build_hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """The variant's CausalLM with weights large enough that logits are not ~0 (norms near 1)."""
    config = hf_config(name)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.08)
            if "bias" in param_name:
                param.normal_(0.0, 0.5)
    return model


def save_hf_model(name: str, out_dir: Path, max_shard_size: str = "60KB") -> transformers.PreTrainedModel:
    """Saves the variant as sharded safetensors (several shards + index) and returns the model."""
    model = build_hf_model(name)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    return model


def hf_logits(model: transformers.PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()
