"""Policy model: which architecture, from which checkpoint, in which precision."""
from __future__ import annotations

import dataclasses
from typing import Optional

from maspo_megatron.config.fields import option


@dataclasses.dataclass
class ModelConfig:
    hf_config: str = option("tiny", help="HF model dir or config.json; 'tiny' = the built-in tiny CPU policy")
    tokenizer: Optional[str] = option(None, help="HF tokenizer dir (default: hf_config's dir); ignored for 'tiny'")
    load: Optional[str] = option(None, help="Megatron dist checkpoint to start from (tools/convert_hf_to_megatron.py)")
    init_from_hf: Optional[str] = option(None, help="HF checkpoint dir to start from, converted on the fly")
    dtype: str = option("fp32", choices=("fp32", "bf16", "fp16"))
    fp8: Optional[str] = option(None, choices=("delayed", "tensorwise", "blockwise", "mxfp8"), help="Transformer Engine FP8 recipe")
    recompute: Optional[str] = option(None, choices=("full", "selective"))
    attention: str = option("auto", choices=("auto", "te", "packed", "dense"),
                            help="how packed rows reach attention: auto = te with Transformer Engine, packed "
                                 "(torch varlen/flex kernels) on a GPU without it, dense (block mask) on the CPU")
    seed: int = option(1234, ge=0)
    # The built-in tiny policy (hf_config: tiny): a Qwen2-shaped model small enough for CPU.
    tiny_layers: int = option(2, ge=1)
    tiny_hidden: int = option(64, ge=8)
    tiny_heads: int = option(4, ge=1)
    tiny_kv_heads: int = option(2, ge=1)
    tiny_ffn: int = option(128, ge=8)
    tiny_max_position_embeddings: int = option(4096, ge=16, help="RoPE length of the tiny policy")
    tiny_tie_embeddings: bool = option(False, help="tie the tiny policy's lm_head to its embedding")
    vocab_divisible_by: int = option(128, ge=1, help="Megatron pads the vocab to a multiple of this x TP")

    def validate(self) -> None:
        if self.tiny_hidden % self.tiny_heads:
            raise ValueError(f"tiny_hidden: {self.tiny_hidden} must be divisible by tiny_heads ({self.tiny_heads})")
        if self.tiny_heads % self.tiny_kv_heads:
            raise ValueError(f"tiny_kv_heads: {self.tiny_kv_heads} must divide tiny_heads ({self.tiny_heads})")
        if self.load and self.init_from_hf:
            raise ValueError("load: set either load or init_from_hf, not both")
