"""A checkpoint that carries a pickled callable (in `.metadata`, in a ShardedObject byte item, in
common.pt, or in a module's `_extra_state` as Transformer Engine stores it) is refused before
anything unpickles it: on resume (`load_checkpoint`), on `model.load` / the KL reference reload
(`load_model_weights`), in the converter's reader (`DistCheckpointReader`) and through the entry
point (one line, exit 2); the callable never runs (its marker file is never created)."""
from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from maspo_megatron.checkpoint import trainer_state as checkpoint
from maspo_megatron.checkpoint.dist_load import load_model_weights
from maspo_megatron.checkpoint.dist_read import DistCheckpointReader
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.guard import is_extra_state, read_metadata, verify_checkpoint_is_data
from tests.helpers import checkpoint_cases as cases
from tests.helpers.loop_cases import EXAMPLE, tiny_overrides
from tests.helpers.multiproc import run_distributed

REPO = Path(__file__).resolve().parents[2]
REFUSAL = "refuses to unpickle builtins.exec (a checkpoint must hold data only)"


class _Evil:
    """Unpickling this runs code that creates `marker` (a harmless stand-in for an attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.fixture(scope="module")
def real_step(tmp_path_factory) -> Path:
    """A real trainer checkpoint (model, distributed optimizer, RNG ShardedObjects) at DP=2."""
    out = tmp_path_factory.mktemp("real")
    run_distributed(cases.save_then_continue, 2, str(out), 1, 1, 0, timeout_s=240)
    return checkpoint.checkpoint_root(out) / "step_1"


def _copy(real_step: Path, tmp_path: Path) -> Path:
    step = tmp_path / "out" / "checkpoints" / real_step.name
    shutil.copytree(real_step, step)
    return step


def _load_all(step: Path) -> list[str]:
    """The one-line errors of the trainer's resume, of model.load and of the converter's reader on `step`."""
    errors = []
    for load in (lambda: checkpoint.load_checkpoint(step, [], None, None), lambda: load_model_weights([], step),
                 lambda: DistCheckpointReader(step)):
        with pytest.raises(CheckpointError) as info:
            load()
        errors.append(str(info.value))
    return errors


def _replace_byte_item(step: Path, select, obj) -> tuple[Path, str]:
    """The first byte item whose key `select(key)` picks replaced by torch.save(obj): the bytes
    appended to its .distcp file, the metadata pointing at them. Returns (file, item key)."""
    metadata = read_metadata(step)
    index = next(i for i in sorted(metadata.storage_data, key=lambda i: i.fqn) if select(i.fqn))
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save(obj, payload)
    distcp = step / info.relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as handle:
        handle.write(payload.getvalue())
    info.offset, info.length = offset, len(payload.getvalue())
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    return distcp, index.fqn


def test_real_checkpoint_is_data(real_step):
    verify_checkpoint_is_data(real_step)  # model, optimizer, RNG state (numpy arrays), common.pt


def test_callable_in_metadata_is_refused_not_run(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    assert _load_all(step) == [f"{step / '.metadata'}: {REFUSAL}"] * 3
    assert not marker.exists()


def test_callable_in_sharded_object_is_refused_not_run(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    distcp, fqn = _replace_byte_item(step, lambda fqn: fqn.startswith("rng_state/"), [_Evil(marker)])
    assert _load_all(step) == [f"{distcp} ({fqn}): {REFUSAL}"] * 3
    assert not marker.exists()


def test_callable_in_common_state_is_refused_not_run(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"driver": _Evil(marker)}, step / "common.pt")
    assert _load_all(step) == [f"{step / 'common.pt'}: {REFUSAL}"] * 3
    assert not marker.exists()


def _te_extra_state(state) -> torch.Tensor:
    """`state` serialised as Transformer Engine's `get_extra_state` does: a plain pickle in a uint8 tensor."""
    return torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)


@pytest.fixture
def te_recipe(monkeypatch):
    """A TE `DelayedScaling` recipe: the real one where TE imports, else a stand-in dataclass and
    enum under TE's module name (their pickle names the same globals)."""
    try:
        from transformer_engine.common.recipe import DelayedScaling

        return DelayedScaling()
    except ImportError:
        pass
    module = types.ModuleType("transformer_engine.common.recipe")

    class Format(enum.Enum):
        E4M3 = 1
        HYBRID = 2

    @dataclasses.dataclass
    class DelayedScaling:
        fp8_format: Format = Format.HYBRID
        amax_history_len: int = 1024
        amax_compute_algo: object = "max"

    for cls in (Format, DelayedScaling):
        cls.__module__, cls.__qualname__ = module.__name__, cls.__name__
        setattr(module, cls.__name__, cls)
    for name in ("transformer_engine", "transformer_engine.common"):  # pickle imports the parents too
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return DelayedScaling()


def _fp8_state(recipe, **extra) -> dict:
    """What TE's delayed-scaling `get_extra_state` pickles: the recipe, scales, amax histories, plain values."""
    return {"recipe": recipe, "scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
            "scale_bwd": torch.ones(2), "amax_history_bwd": torch.zeros(4, 2),
            "extra_fp8_variables": {"num_gemms": 1, "fp8_checkpoint": True, **extra}}


def test_te_fp8_extra_state_is_data(real_step, tmp_path, te_recipe):
    step = _copy(real_step, tmp_path)
    _replace_byte_item(step, is_extra_state, _te_extra_state(_fp8_state(te_recipe)))
    verify_checkpoint_is_data(step)


class _EvilStorage:
    """Pickles as a tensor storage does (`torch.storage._load_from_bytes`, which torch.loads the
    bytes with weights_only=False), the bytes holding an `_Evil`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        inner = io.BytesIO()
        torch.save([_Evil(self.marker)], inner)
        return (torch.storage._load_from_bytes, (inner.getvalue(),))


@pytest.mark.parametrize("carrier", [_Evil, _EvilStorage], ids=["in_the_state", "in_a_tensor_storage"])
def test_callable_in_extra_state_is_refused_not_run(real_step, tmp_path, te_recipe, carrier):
    """The pickle TE's `set_extra_state` would `pickle.loads` carries a callable: refused by every
    loader, with the file and key named, and never run; TE's own unpickling of the same bytes would run it."""
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    payload = _te_extra_state(_fp8_state(te_recipe, hook=carrier(marker)))
    distcp, fqn = _replace_byte_item(step, is_extra_state, payload)
    assert "_extra_state" in fqn
    assert _load_all(step) == [f"{distcp} ({fqn}): {REFUSAL}"] * 3
    assert not marker.exists()
    pickle.loads(payload.numpy().tobytes())  # what set_extra_state does with it
    assert marker.exists()


def test_callable_in_a_recipe_field_is_refused(real_step, tmp_path, te_recipe):
    step = _copy(real_step, tmp_path)
    te_recipe.amax_compute_algo = shutil.rmtree  # a callable by reference: TE would call it on every step
    distcp, fqn = _replace_byte_item(step, is_extra_state, _te_extra_state(_fp8_state(te_recipe)))
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint_is_data(step)
    assert str(info.value) == f"{distcp} ({fqn}): refuses to unpickle shutil.rmtree (a checkpoint must hold data only)"


def test_callable_in_old_format_extra_state_is_refused_not_run(real_step, tmp_path):
    """TE's older format: a BytesIO holding a torch.save file (Megatron allows BytesIO under weights_only)."""
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    inner = io.BytesIO()
    torch.save({"extra_fp8_variables": _Evil(marker)}, inner)
    distcp, fqn = _replace_byte_item(step, is_extra_state, inner)
    assert _load_all(step) == [f"{distcp} ({fqn}): {REFUSAL}"] * 3
    assert not marker.exists()


def test_function_of_a_metadata_module_is_refused(real_step, tmp_path):
    """The `.metadata` allow-list admits DCP's record classes, not any name in DCP's modules."""
    from torch.distributed.checkpoint import state_dict_loader

    step = _copy(real_step, tmp_path)
    (step / ".metadata").write_bytes(pickle.dumps(state_dict_loader.load))
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint_is_data(step)
    assert str(info.value) == (f"{step / '.metadata'}: refuses to unpickle torch.distributed.checkpoint.state_dict_loader.load"
                               " (a checkpoint must hold data only)")


def test_truncated_item_names_file_and_key(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    metadata = read_metadata(step)
    index = next(i for i in sorted(metadata.storage_data, key=lambda i: i.fqn) if i.fqn.startswith("rng_state/"))
    info = metadata.storage_data[index]
    distcp = step / info.relative_path
    os.truncate(distcp, info.offset + info.length - 1)
    with pytest.raises(CheckpointError) as info_error:
        verify_checkpoint_is_data(step)
    assert str(info_error.value) == f"{distcp} ({index.fqn}): truncated (item of {info.length} bytes at offset {info.offset})"


def test_entry_point_refuses_on_resume_in_one_line_exit_2(real_step, tmp_path):
    """`python -m maspo_megatron.train` resuming from a crafted `latest`: one line on stderr, exit 2."""
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    (step.parent / "latest").write_text(step.name + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO),
               PYTHONWARNINGS="ignore")
    env.pop("MASTER_PORT", None)
    args = tiny_overrides(str(step.parent.parent), "trainer.sft_warmup_steps=0", "trainer.resume=true")
    proc = subprocess.run([sys.executable, "-m", "maspo_megatron.train", "--config", EXAMPLE, *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert f"maspo-train: {step / '.metadata'}: {REFUSAL}" in proc.stderr.splitlines()
    assert not marker.exists()


def test_every_load_goes_through_the_guard():
    """Source scan of the package, tools and benchmarks: Megatron's `dist_checkpointing.load` is
    called only by `dist_load.load_dist_checkpoint` (after the guard), DCP's `load` only by the
    converter's reader (after the guard, tensors only), every `torch.load` passes weights_only=True,
    and nothing calls `pickle.load(s)` (the allow-list unpicklers subclass `pickle.Unpickler`)."""
    import ast

    allowed = {("dist_checkpointing", "load"): {"maspo_megatron/checkpoint/dist_load.py"},
               ("dcp", "load"): {"maspo_megatron/checkpoint/dist_read.py"}}
    found, unsafe = {key: set() for key in allowed}, []
    for top in ("maspo_megatron", "tools", "benchmarks"):
        for path in sorted((REPO / top).rglob("*.py")):
            rel = str(path.relative_to(REPO))
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and isinstance(node.func.value, ast.Name)):
                    continue
                key = (node.func.value.id, node.func.attr)
                if key in allowed:
                    found[key].add(rel)
                elif key == ("torch", "load"):
                    weights_only = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
                    if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                        unsafe.append(f"{rel}:{node.lineno}: torch.load without weights_only=True")
                elif key in {("pickle", "load"), ("pickle", "loads")}:
                    unsafe.append(f"{rel}:{node.lineno}: {key[0]}.{key[1]}")
    assert found == allowed and not unsafe, (found, unsafe)
