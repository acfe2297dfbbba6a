"""Engines by name: `build_engine(cfg.rollout, ...)` returns the engine `cfg.rollout.engine` names.

    register_engine("my_engine", factory, default_transport, EngineTraits(...))  # factory(rollout_cfg, **kwargs)
    default_transport("sglang", cuda=True)  -> the weight transport `weight_sync.transport: auto` picks
    engine_traits("sglang")                 -> what the trainer, the syncer and the planner may assume

Each engine names its default weight transport and declares its traits here, once: both are known on
every rank without building the engine, and code outside the engine's package asks for a trait,
never for an engine's name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from maspo_megatron.rollout.types import RolloutEngine


@dataclasses.dataclass(frozen=True)
class EngineTraits:
    """What code outside an engine's package may assume about it (all False: a plain remote engine).

    holds_hf_model: the engine object's `.model` is a `transformers` model holding exactly the synced HF
        weights; `export_hf` saves it directly instead of converting the latest dist checkpoint.
    reads_back_whole_tensors: a weight read back for `weight_sync.verify_weights` is the whole tensor;
        otherwise only its first `weight_sync.verify_rows` rows are compared.
    sglang_servers: it generates on SGLang servers set by `rollout.sglang`: the trainer launches them on the
        training GPUs unless `rollout.sglang.urls` is given, and the memory planner counts their weights
        and KV pool and checks their TP size against the KV heads.
    """

    holds_hf_model: bool = False
    reads_back_whole_tensors: bool = False
    sglang_servers: bool = False


_ENGINES: dict[str, Callable[..., RolloutEngine]] = {}
_DEFAULT_TRANSPORTS: dict[str, Callable[[bool], str]] = {}
_TRAITS: dict[str, EngineTraits] = {}


def register_engine(name: str, factory: Callable[..., RolloutEngine],
                    default_transport: Callable[[bool], str] = lambda cuda: "disk",
                    traits: EngineTraits = EngineTraits()) -> None:
    """`default_transport(cuda)`: the transport `auto` means for this engine, with or without CUDA."""
    _ENGINES[name] = factory
    _DEFAULT_TRANSPORTS[name] = default_transport
    _TRAITS[name] = traits


def unregister_engine(name: str) -> None:
    """Removes an engine (tests register stand-ins for one test only)."""
    _ENGINES.pop(name, None)
    _DEFAULT_TRANSPORTS.pop(name, None)
    _TRAITS.pop(name, None)


def engine_names() -> tuple[str, ...]:
    """The registered engines, sorted (the choices of rollout.engine)."""
    return tuple(sorted(_ENGINES))


def default_transport(engine_name: str, cuda: bool) -> str:
    if engine_name not in _DEFAULT_TRANSPORTS:
        raise ValueError(f"rollout.engine: {engine_name!r} is not one of {sorted(_ENGINES)}")
    return _DEFAULT_TRANSPORTS[engine_name](cuda)


def engine_traits(engine_name: str) -> EngineTraits:
    """The traits `engine_name` registered with (one-line error naming rollout.engine for an unknown name)."""
    if engine_name not in _TRAITS:
        raise ValueError(f"rollout.engine: {engine_name!r} is not one of {sorted(_ENGINES)}")
    return _TRAITS[engine_name]


def _build_local(rollout_cfg: Any, *, model: Any = None, hf_config: Any = None, device: Any = None,
                 tokenizer: Any = None, init_seed: int = 0, model_path: Optional[str] = None, weight_version: int = 0,
                 **_: Any) -> RolloutEngine:
    """model: a HF causal LM object (used in place); or hf_config (+ device, tokenizer, init_seed): the trainer's
    policy architecture, built fresh (the first weight sync sets its weights); or model_path: HF dir / config.json."""
    from maspo_megatron.rollout.local.engine import LocalEngine, hf_causal_lm_for_sync, load_hf_causal_lm

    if model is None and hf_config is not None:
        model = hf_causal_lm_for_sync(hf_config, device, rollout_cfg.local_dtype, tokenizer, init_seed)
    elif model is None:
        if model_path is None:
            raise ValueError("rollout.engine=local needs a HF model object, the policy's HF config or a model path")
        model = load_hf_causal_lm(model_path)
    return LocalEngine(model, batch_size=rollout_cfg.local_batch_size, seed=rollout_cfg.seed, weight_version=weight_version)


def _build_sglang(rollout_cfg: Any, *, model_path: Optional[str] = None, weight_version: int = 0, **_: Any) -> RolloutEngine:
    from maspo_megatron.rollout.sglang.engine import SGLangEngine

    return SGLangEngine(rollout_cfg.sglang, model_path=model_path, weight_version=weight_version)


def _sglang_default_transport(cuda: bool) -> str:
    """CUDA IPC into colocated servers on a GPU node; safetensors on a shared disk without CUDA."""
    return "tensor" if cuda else "disk"


register_engine("local", _build_local, default_transport=lambda cuda: "local",
                traits=EngineTraits(holds_hf_model=True, reads_back_whole_tensors=True))
register_engine("sglang", _build_sglang, default_transport=_sglang_default_transport,
                traits=EngineTraits(sglang_servers=True))


def check_rollout_names(rollout_cfg: Any) -> None:
    """Refuses an engine or weight transport that no registry holds, with a one-line error naming the key.

    The trainer calls it before anything starts (config/ cannot: it sits below rollout/).
    """
    # imported here: weight_sync/ imports this module's package
    from maspo_megatron.rollout.weight_sync.transports import TRANSPORTS

    if rollout_cfg.engine not in _ENGINES:
        raise ValueError(f"rollout.engine: {rollout_cfg.engine!r} is not one of {list(engine_names())}")
    transport = rollout_cfg.weight_sync.transport
    if transport != "auto" and transport not in TRANSPORTS:
        raise ValueError(f"rollout.weight_sync.transport: {transport!r} is not one of {['auto', *sorted(TRANSPORTS)]}")


def build_engine(rollout_cfg: Any, **kwargs: Any) -> RolloutEngine:
    """`rollout_cfg`: a `RolloutConfig`; kwargs go to the engine's factory, which takes what it needs and ignores
    the rest. The trainer passes every factory the same: model_path, hf_config (the policy's), device, tokenizer,
    init_seed, weight_version."""
    name = rollout_cfg.engine
    if name not in _ENGINES:
        raise ValueError(f"rollout.engine: {name!r} is not one of {sorted(_ENGINES)}")
    return _ENGINES[name](rollout_cfg, **kwargs)

