"""The built-in tiny policy (`model.hf_config: tiny`): a Qwen2-shaped HF config from the tiny_* fields."""
from __future__ import annotations

import transformers

from maspo_megatron.config.model import ModelConfig


def tiny_hf_config(model_cfg: ModelConfig, vocab_size: int) -> transformers.Qwen2Config:
    """An in-memory Qwen2 config (qkv bias, GQA, SwiGLU, RMSNorm) sized by model_cfg.tiny_*.

    vocab_size comes from the tokenizer (data/tiny_tokenizer.py), so the model and the
    tokenizer agree without this module importing the data package.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size: {vocab_size} must be >= 1 (take it from the tokenizer)")
    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=model_cfg.tiny_hidden,
        intermediate_size=model_cfg.tiny_ffn,
        num_hidden_layers=model_cfg.tiny_layers,
        num_attention_heads=model_cfg.tiny_heads,
        num_key_value_heads=model_cfg.tiny_kv_heads,
        max_position_embeddings=model_cfg.tiny_max_position_embeddings,
        tie_word_embeddings=model_cfg.tiny_tie_embeddings,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        use_sliding_window=False,
        hidden_act="silu",
    )
