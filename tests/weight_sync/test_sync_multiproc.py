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


VICTIM = "model.layers.2.mlp.up_proj.weight"  # second half of a fused fc1, from pipeline stage 1


@pytest.fixture(scope="module")
def local_run():
    """ONE launch of four processes: untied sync/train/sync, a corrupted sync, then the tied model."""
    return run_distributed(cases.case_local_all, WORLD, VICTIM, timeout_s=300)


@pytest.fixture(scope="module")
def untied_run(local_run):
    return [rank["untied"] for rank in local_run]


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


def test_tied_output_layer(local_run):
    rank0 = local_run[0]["tied"]
    reference = cases.reference_state(tied=True)
    assert "lm_head.weight" in reference  # HF lists the tied head under its own name too
    _assert_bit_exact(rank0["after_first"], reference, "tied: first sync")
    _assert_bit_exact(rank0["after_second"], {**rank0["export"], "lm_head.weight": rank0["export"][
        "model.embed_tokens.weight"]}, "tied: second sync")
    assert rank0["report"].num_tensors == len(reference) - 1  # lm_head is not sent: the engine ties it
    diff = (rank0["engine_log_probs"] - local_run[2]["tied"]["trainer_log_probs"]).abs().max().item()
    assert diff <= 1e-5


def test_shared_memory_and_collective_tp_gather_agree(untied_run):
    for rank in (0, 2):  # the TP sources of both pipeline stages
        result = untied_run[rank]["gather_paths"]
        assert result["compared"] >= 10 and result["mismatched"] == []


def test_verify_weights_catches_a_corrupted_tensor(untied_run):
    messages = [rank["corrupted_message"] for rank in untied_run]
    assert all(VICTIM in m and "verify_weights" in m for m in messages), messages  # every rank stops
    assert all("gate_proj" not in m for m in messages)


@pytest.fixture()
def standin_servers(tmp_path):
    from tests.helpers.sglang_standin import StandinServer

    model_dir = tmp_path / "engine_model"
    cases.hf_model(False, cases.SEED_ENGINE).save_pretrained(model_dir)
    # readback_any_model: these Qwen2 servers answer /get_weights_by_name (0.5.23 would not), so the test
    # can read back what landed and verify_weights runs; test_verify_weights_refused_at_start_up has the truth
    servers = {"new": StandinServer(str(model_dir), readback_any_model=True).start(),
               "old": StandinServer(str(model_dir), weight_session=False, readback_any_model=True,
                                   version="0.5.2").start()}  # < 0.5.23: no session, one dtype per bucket
    yield servers
    for server in servers.values():
        server.stop()


def _check_standin_run(rank0, plan):
    assert [result["key"] for result in rank0] == plan
    previous = None
    for step, result in enumerate(rank0, 1):
        key = result["key"]
        _assert_bit_exact(result["held"], result["expected"], f"step {step} {key}: server vs HF export")
        assert result["held"]["model.embed_tokens.weight"].shape[0] == cases.VOCAB
        assert next(iter(result["version"].values()))["weight_version"] == str(10 + step)
        assert result["report"].transport == key[1] and result["report"].verified
        if previous is not None:  # the policy moved between syncs, so a stale server would fail above
            assert not torch.equal(previous, result["expected"]["model.norm.weight"])
        previous = result["expected"]["model.norm.weight"]


def test_sync_into_standin_servers_over_disk_tensor_distributed(standin_servers, tmp_path):
    """disk, tensor (flattened buckets) and distributed (one gloo group per pipeline stage, joined by
    the stand-in the way SGLang's init_custom_process_group joins; each sync's syncer destroys its
    groups on close, and the next one joins again under the same names) into a 0.5.23 server, then tensor into an older server without
    /begin_weight_update (detected; updates are sent without a session)."""
    urls = {label: server.url for label, server in standin_servers.items()}
    plan = [("new", "disk"), ("new", "tensor"), ("new", "distributed"), ("new", "distributed"), ("old", "tensor")]
    rank0 = run_distributed(cases.case_sglang, WORLD, urls, str(tmp_path / "sync"), plan, timeout_s=300)[0]
    _check_standin_run(rank0, plan)
    assert [p.name for p in (tmp_path / "sync").iterdir()] == ["v00000011"]  # the disk version dir
    assert standin_servers["new"].call(lambda: dict(standin_servers["new"].groups)) == {}  # destroyed on close


def test_verify_weights_refused_at_start_up_naming_the_model_class(tmp_path):
    """A Qwen2 server as sglang 0.5.23 serves it (no /get_weights_by_name for Qwen2): verify_weights stops
    every rank when the syncer is built, naming the model class, instead of crashing the first sync."""
    from tests.helpers.sglang_standin import StandinServer

    model_dir = tmp_path / "engine_model"
    cases.hf_model(False, cases.SEED_ENGINE).save_pretrained(model_dir)
    server = StandinServer(str(model_dir)).start()
    try:
        messages = run_distributed(cases.case_verify_refused, 2, server.url, timeout_s=120)
    finally:
        server.stop()
    for message in messages:
        assert "verify_weights" in message and "Qwen2ForCausalLM" in message and "LlamaForCausalLM" in message, message
