"""TP2 x PP2 Megatron policy -> engines, on 4 gloo processes (issue 7's CPU acceptance tests)."""
import pytest
import torch

from tests.helpers.multiproc import run_distributed
from tests.weight_sync import _sync_cases as cases

WORLD = 4


def _assert_bit_exact(got: dict, want: dict, what: str):
    assert set(got) == set(want), f"{what}: names differ: {set(got) ^ set(want)}"
    for name in want:
        assert got[name].shape == want[name].shape, f"{what}: {name}"
        assert torch.equal(got[name], want[name]), f"{what}: {name} differs"


@pytest.fixture(scope="module")
def untied_run():
    return run_distributed(cases.case_local, WORLD, False, timeout_s=240)


def test_local_sync_is_bit_exact_and_versions_advance(untied_run):
    rank0 = untied_run[0]
    reference = cases.reference_state(tied=False)
    _assert_bit_exact(rank0["after_first"], reference, "first sync vs HF reference")
    assert rank0["after_first"]["model.embed_tokens.weight"].shape[0] == cases.VOCAB  # padded vocab trimmed
    assert rank0["version_1"] == 1 and rank0["version_2"] == 2
    report = rank0["report"]
    assert report.num_tensors == len(reference) and report.verified
    # buckets smaller than the largest tensor (embedding / lm_head: 100 x 32 x 4 B) were in play
    assert report.max_bucket_bytes > cases.weight_sync_cfg().bucket_bytes


def test_after_training_step_engine_matches_export_and_trainer_log_probs(untied_run):
    rank0 = untied_run[0]
    reference = cases.reference_state(tied=False)
    _assert_bit_exact(rank0["after_second"], rank0["export"], "second sync vs models' HF export")
    changed = [n for n in reference if not torch.equal(rank0["after_second"][n], reference[n])]
    assert len(changed) > len(reference) // 2, "the training step should have moved most tensors"
    last_stage_source = untied_run[2]  # rank 2 = tp 0 of the last pipeline stage
    engine_lp, trainer_lp = rank0["engine_log_probs"], last_stage_source["trainer_log_probs"]
    assert engine_lp.shape == trainer_lp.shape and engine_lp.numel() == 12
    diff = (engine_lp - trainer_lp).abs().max().item()
    print(f"engine vs trainer log-prob max |diff| after train step + sync: {diff:.3e}")
    assert diff <= 1e-5


def test_tied_output_layer():
    rank0 = run_distributed(cases.case_local, WORLD, True, timeout_s=240)[0]
    reference = cases.reference_state(tied=True)
    assert "lm_head.weight" in reference  # HF lists the tied head under its own name too
    _assert_bit_exact(rank0["after_first"], reference, "tied: first sync")
    _assert_bit_exact(rank0["after_second"], {**rank0["export"], "lm_head.weight": rank0["export"][
        "model.embed_tokens.weight"]}, "tied: second sync")
    assert rank0["report"].num_tensors == len(reference) - 1  # lm_head is not sent: the engine ties it


def test_verify_weights_catches_a_corrupted_tensor():
    victim = "model.layers.2.mlp.up_proj.weight"  # second half of a fused fc1, from pipeline stage 1
    messages = run_distributed(cases.case_corrupted, WORLD, victim, timeout_s=240)
    assert all(victim in m and "verify_weights" in m for m in messages), messages
    assert all("gate_proj" not in m for m in messages)
