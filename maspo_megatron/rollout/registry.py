"""Engines by name: `build_engine(cfg.rollout, ...)` returns the engine `cfg.rollout.engine` names.

    register_engine("my_engine", factory)   # factory(rollout_cfg, **kwargs) -> RolloutEngine
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from maspo_megatron.rollout.types import RolloutEngine

_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}


def register_engine(name: str, factory: Callable[..., RolloutEngine]) -> None:
    _ENGINES[name] = factory


def _build_local(rollout_cfg: Any, *, model: Any = None, model_path: Optional[str] = None, weight_version: int = 0, **_: Any) -> RolloutEngine:
    """model: a HF causal LM object (used in place); or model_path: HF dir / config.json."""
    from maspo_megatron.rollout.local.engine import LocalEngine, load_hf_causal_lm

    if model is None:
        if model_path is None:
            raise ValueError("rollout.engine=local needs a HF model object or a model path")
        model = load_hf_causal_lm(model_path)
    return LocalEngine(model, batch_size=rollout_cfg.local_batch_size, seed=rollout_cfg.seed, weight_version=weight_version)


def _build_sglang(rollout_cfg: Any, *, model_path: Optional[str] = None, weight_version: int = 0, **_: Any) -> RolloutEngine:
    from maspo_megatron.rollout.sglang.engine import SGLangEngine

    return SGLangEngine(rollout_cfg.sglang, model_path=model_path, weight_version=weight_version)


register_engine("local", _build_local)
register_engine("sglang", _build_sglang)


def build_engine(rollout_cfg: Any, **kwargs: Any) -> RolloutEngine:
    """`rollout_cfg`: a `RolloutConfig`; kwargs go to the engine's factory (model, model_path, weight_version)."""
    name = rollout_cfg.engine
    if name not in _ENGINES:
        raise ValueError(f"rollout.engine: {name!r} is not one of {sorted(_ENGINES)}")
    return _ENGINES[name](rollout_cfg, **kwargs)
