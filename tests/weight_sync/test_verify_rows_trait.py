"""How much of a tensor verify_weights compares follows the engine's registered trait
(`reads_back_whole_tensors`, rollout/registry.py), not its name."""
from tests.helpers.multiproc import run_distributed
from tests.weight_sync import _sync_cases as cases

VICTIM = "model.layers.1.mlp.down_proj.weight"  # [hidden 32, ffn 64]: its last element sits in row 31


def test_whole_tensor_readback_catches_damage_past_verify_rows():
    (result,) = run_distributed(cases.case_verify_rows_follow_the_trait, 1, VICTIM, timeout_s=240)
    # whole tensors compared: the damaged last row is caught
    assert VICTIM in result["scratch_whole"] and "verify_weights" in result["scratch_whole"]
    # first row only (what a server engine gives back): the same damage passes unseen
    assert result["scratch_rows"] == ""
