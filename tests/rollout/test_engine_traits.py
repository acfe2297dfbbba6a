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
from tests.helpers import loop_cases
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


def _export_case(output_dir: str, holds_hf_model: bool) -> dict:
    """Two RL steps and the end-of-run HF export with the CPU engine registered under another name."""
    from maspo_megatron.rollout.registry import build_engine

    def cpu_engine(rollout_cfg, **facts):
        return build_engine(dataclasses.replace(rollout_cfg, engine="local"), **facts)

    register_engine("scratch_cpu", cpu_engine, default_transport=lambda cuda: "local",
                    traits=EngineTraits(holds_hf_model=holds_hf_model, reads_back_whole_tensors=True))
    try:
        return loop_cases.train(output_dir, ["rollout.engine=scratch_cpu", "trainer.eval_at_end=false"])
    finally:
        unregister_engine("scratch_cpu")


def _hf_tensors(hf_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(hf_dir.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def test_export_hf_saves_the_engine_model_by_trait(tmp_path):
    import torch

    from maspo_megatron.checkpoint.convert import HF_CONFIG_SUBDIR

    latest = {}
    for holds in (True, False):
        out = tmp_path / f"holds_hf_model_{holds}"
        (result,) = run_distributed(_export_case, 1, str(out), holds, timeout_s=240)
        assert result["code"] == 0
        latest[holds] = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    # The converter path reads the latest dist checkpoint and puts the policy's HF config beside it;
    # saving the engine's model leaves the checkpoint alone.
    assert not (latest[True] / HF_CONFIG_SUBDIR).exists()
    assert (latest[False] / HF_CONFIG_SUBDIR).is_dir()
    saved, converted = (_hf_tensors(tmp_path / f"holds_hf_model_{holds}" / "hf") for holds in (True, False))
    assert saved and set(saved) == set(converted)
    assert all(torch.equal(saved[name], converted[name]) for name in saved)  # both paths: the same weights
