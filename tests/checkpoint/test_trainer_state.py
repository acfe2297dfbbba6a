"""Checkpoints: atomic save, latest pointer, keep-last-k, exact resume, resume at another DP size,
and a kill while writing leaves `latest` loadable."""
from __future__ import annotations

import torch

from maspo_megatron.checkpoint import trainer_state as checkpoint
from tests.helpers import checkpoint_cases as cases
from tests.helpers.multiproc import DistributedTestError, run_distributed


def _assert_same_params(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if atol == 0.0:
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def test_kill_while_writing_then_exact_resume_at_same_and_other_dp(tmp_path):
    """Reference: 2 steps, save, 2 steps (DP=2). Then: 2 steps, save, the ranks die while writing
    step 3 (after the tensors are on disk, before the rename): `latest` still names step_2, and
    resuming from it + 2 steps gives bit-identical params, LR and RNG at DP=2, and equal params
    to fp32 rounding at DP=1 (the distributed optimizer's state resharded)."""
    straight = run_distributed(cases.save_then_continue, 2, str(tmp_path / "a"), 1, 2, 2, timeout_s=240)
    out = tmp_path / "b"
    try:
        run_distributed(cases.save_then_continue, 2, str(out), 1, 2, 0, "after_data", timeout_s=240)
    except DistributedTestError:
        pass  # the ranks "died" on purpose
    else:
        raise AssertionError("the dying save should have killed the ranks")
    root = checkpoint.checkpoint_root(out)
    assert (root / "latest").read_text().strip() == "step_2"
    assert not (root / "step_3").exists()
    resumed_dp2 = run_distributed(cases.resume_and_continue, 2, str(out), 1, 2, timeout_s=240)
    resumed_dp1 = run_distributed(cases.resume_and_continue, 1, str(out), 1, 2, timeout_s=240)[0]
    assert resumed_dp1["latest"] == "step_2"
    assert resumed_dp1["driver"] == {"step": 2, "sampler": {"epoch": 0, "offset": 3}}
    for rank in range(2):
        _assert_same_params(straight[rank]["params"], resumed_dp2[rank]["params"])
        assert torch.equal(straight[rank]["rng_probe"], resumed_dp2[rank]["rng_probe"])
    assert straight[0]["lr"] == resumed_dp2[0]["lr"] == resumed_dp1["lr"]
    _assert_same_params(straight[0]["params"], resumed_dp1["params"], atol=1e-6)
    assert torch.equal(straight[0]["rng_probe"], resumed_dp1["rng_probe"])


def _fake_complete(path):
    path.mkdir(parents=True)
    (path / "metadata.json").write_text("{}")
    (path / checkpoint.STATE_FILE).write_text("{}")


def test_find_latest_falls_back_to_newest_complete(tmp_path):
    root = tmp_path / "checkpoints"
    assert checkpoint.find_latest(root) is None
    _fake_complete(root / "step_3")
    _fake_complete(root / "step_10")
    (root / "step_11").mkdir()  # incomplete
    assert checkpoint.find_latest(root).name == "step_10"
    (root / "latest").write_text("step_3\n")
    assert checkpoint.find_latest(root).name == "step_3"
    (root / "latest").write_text("step_11\n")  # pointer to something incomplete: fall back
    assert checkpoint.find_latest(root).name == "step_10"


def test_prune_keeps_last_k(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        _fake_complete(root / f"step_{step}")
    (root / ".tmp_step_5").mkdir()
    checkpoint.prune_checkpoints(root, keep_last=2, keep=root / "step_4")
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]
