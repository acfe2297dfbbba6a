"""A checkpoint that carries a pickled callable (in `.metadata`, in a ShardedObject byte item or in
common.pt) is refused before anything unpickles it: on resume (`load_checkpoint`), on `model.load`
/ the KL reference reload (`load_model_weights`) and through the entry point (one line, exit 2);
the callable never runs (its marker file is never created)."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maspo_megatron.checkpoint import trainer_state as checkpoint
from maspo_megatron.checkpoint.dist_load import load_model_weights
from maspo_megatron.checkpoint.dist_read import read_metadata
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.guard import verify_checkpoint_is_data
from tests.checkpoint import _trainer_state_cases as cases
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


def _load_both(step: Path) -> list[str]:
    """The one-line errors of the trainer's resume and of model.load on `step`."""
    errors = []
    for load in (lambda: checkpoint.load_checkpoint(step, [], None, None), lambda: load_model_weights([], step)):
        with pytest.raises(CheckpointError) as info:
            load()
        errors.append(str(info.value))
    return errors


def test_real_checkpoint_is_data(real_step):
    verify_checkpoint_is_data(real_step)  # model, optimizer, RNG state (numpy arrays), common.pt


def test_callable_in_metadata_is_refused_not_run(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    (step / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    assert _load_both(step) == [f"{step / '.metadata'}: {REFUSAL}"] * 2
    assert not marker.exists()


def test_callable_in_sharded_object_is_refused_not_run(real_step, tmp_path):
    """The RNG ShardedObject's bytes replaced (appended to its .distcp file, the metadata pointing at them)."""
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    metadata = read_metadata(step)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state/"))
    info = metadata.storage_data[index]
    payload = io.BytesIO()
    torch.save([_Evil(marker)], payload)
    distcp = step / info.relative_path
    offset = distcp.stat().st_size
    with open(distcp, "ab") as handle:
        handle.write(payload.getvalue())
    info.offset, info.length = offset, len(payload.getvalue())
    (step / ".metadata").write_bytes(pickle.dumps(metadata))
    assert _load_both(step) == [f"{distcp} ({index.fqn}): {REFUSAL}"] * 2
    assert not marker.exists()


def test_callable_in_common_state_is_refused_not_run(real_step, tmp_path):
    step = _copy(real_step, tmp_path)
    marker = tmp_path / "pwned"
    torch.save({"driver": _Evil(marker)}, step / "common.pt")
    assert _load_both(step) == [f"{step / 'common.pt'}: {REFUSAL}"] * 2
    assert not marker.exists()


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
