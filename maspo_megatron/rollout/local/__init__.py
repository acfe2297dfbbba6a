"""In-process `transformers` rollout engine (CPU)."""
from maspo_megatron.rollout.local.engine import LocalEngine, load_hf_causal_lm

__all__ = ["LocalEngine", "load_hf_causal_lm"]
