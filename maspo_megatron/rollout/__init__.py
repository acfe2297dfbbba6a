"""Rollout engines behind one interface (`RolloutEngine`), chosen by name: `build_engine(cfg.rollout, ...)`.

local: in-process `transformers` model (CPU default). sglang: SGLang servers over HTTP.
"""
from maspo_megatron.rollout.registry import build_engine, register_engine
from maspo_megatron.rollout.types import FINISH_REASONS, RolloutEngine, RolloutError, Sample, SamplingParams

__all__ = ["FINISH_REASONS", "RolloutEngine", "RolloutError", "Sample", "SamplingParams", "build_engine", "register_engine"]
