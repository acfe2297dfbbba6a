"""Engine traits (rollout/registry.py): code outside an engine's package asks for a trait, never for an
engine's name. Throwaway engines under other names take the branch their declared traits say."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path

import pytest

from maspo_megatron.config import load_config
from maspo_megatron.launch.memory import ClusterShape, PlanError, plan_memory
from maspo_megatron.models.meta import model_meta
from maspo_megatron.rollout.registry import EngineTraits, engine_traits, register_engine, unregister_engine
from tests.helpers.multiproc import run_distributed
from tests.helpers.sglang_standin.process import PACKAGE_DIR as STANDIN_SCRIPT

QWEN7B = Path(__file__).resolve().parents[2] / "examples" / "hf_configs" / "qwen2.5-7b-instruct.json"  # 4 KV heads


@contextlib.contextmanager
def scratch_engine(name: str, **traits: bool):
    """A throwaway engine (it never builds anything) registered for the block only."""
    register_engine(name, lambda rollout_cfg, **_: None, traits=EngineTraits(**traits))
    try:
        yield name
    finally:
        unregister_engine(name)


def test_builtin_engines_declare_their_traits_and_unknown_names_are_refused():
    assert engine_traits("local") == EngineTraits(holds_hf_model=True, reads_back_whole_tensors=True)
    assert engine_traits("sglang") == EngineTraits(sglang_servers=True)
    with scratch_engine("scratch_plain"):
        assert engine_traits("scratch_plain") == EngineTraits()  # nothing declared: nothing assumed
    with pytest.raises(ValueError, match="^rollout.engine: 'scratch_plain' is not one of \\['local', 'sglang'\\]$"):
        engine_traits("scratch_plain")  # unregistering forgets the traits too


def _plan(engine: str, *overrides: str):
    cfg = load_config(None, ["parallel.tp=2", "model.dtype=bf16", f"rollout.engine={engine}",
                             "rollout.sglang.mem_fraction_static=0.5", *overrides])
    return plan_memory(model_meta(QWEN7B, tp=2), cfg, ClusterShape(nodes=1, gpus_per_node=8, gpu_mem_gib=80))


def test_memory_plan_counts_sglang_servers_by_trait():
    with scratch_engine("scratch_servers", sglang_servers=True), scratch_engine("scratch_plain"):
        served = _plan("scratch_servers", "rollout.sglang.tp_size=2")
        assert served.mode == "colocated"
        assert served.rollout_weights == 7_615_616_512  # Qwen2.5-7B: 7,615,616,512 bf16 parameters / SGLang TP 2
        plain = _plan("scratch_plain", "rollout.sglang.tp_size=2")
        assert plain.mode == "local" and plain.rollout_weights == 0 and plain.kv_cache == 0
        # SGLang TP 3 and 4 KV heads do not divide one another: refused only for an engine that runs SGLang
        with pytest.raises(PlanError, match="^rollout.sglang.tp_size: 3 and num_key_value_heads \\(4\\)"):
            _plan("scratch_servers", "rollout.sglang.tp_size=3")
        assert _plan("scratch_plain", "rollout.sglang.tp_size=3").mode == "local"


def _fleet_case(log_dir: str) -> dict:
    """start_rollout_fleet for a throwaway engine with and without `sglang_servers` (stand-in servers)."""
    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.setup import start_rollout_fleet

    dims = init_distributed(ParallelConfig(), seed=1)
    out = {}
    with scratch_engine("scratch_servers", sglang_servers=True), scratch_engine("scratch_plain"):
        for name in ("scratch_servers", "scratch_plain"):
            cfg = load_config(None, [f"rollout.engine={name}"])
            sglang = dataclasses.replace(cfg.rollout.sglang, launch_command=[sys.executable, STANDIN_SCRIPT, "--zero-latency"],
                                         startup_timeout_s=120, log_dir=log_dir)
            cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sglang=sglang))
            fleet = start_rollout_fleet(cfg, dims)
            out[name] = None if fleet is None else list(fleet.urls)
            if fleet is not None:
                fleet.shutdown()
    return out


def test_trainer_launches_servers_by_trait(tmp_path):
    (result,) = run_distributed(_fleet_case, 1, str(tmp_path), timeout_s=240)
    assert len(result["scratch_servers"]) == 1  # rollout.sglang.num_servers=1: one stand-in launched
    assert result["scratch_plain"] is None
