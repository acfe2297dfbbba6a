"""`trainer/offload.py`: the trainer's optimizer state, gradient buffers and parameters leave the device
(storages of 0 bytes, the same tensor objects) and come back exactly, so training continues as if nothing
had happened: two Adam steps with a full offload / reload between them (and a partial one inside a
`resident()` block) give bit-identical parameters to the same steps without offload. Two gloo ranks,
Megatron DDP + distributed optimizer over the tiny GPT. The frozen KL reference, as the trainer builds it,
leaves with the optimizer state when TrainerOffload is given it, and comes back bit-identical."""
import torch

from tests.helpers.multiproc import run_distributed


def _storage_bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def case_offload(with_offload: bool) -> dict:
    from maspo_megatron.trainer.offload import GRADS, OPTIMIZER, PARAMS, TrainerOffload, ddp_buffers, optimizer_tensors
    from tests.helpers.checkpoint_cases import fake_grad_step, params_of, setup_policy

    dims, chunks, optimizer, scheduler = setup_policy(tp=1, distributed_optimizer=True)
    offload = TrainerOffload(chunks, optimizer, enabled=with_offload, rank=dims.rank)
    out = {}
    fake_grad_step(chunks, optimizer, scheduler, step=1)
    states = optimizer_tensors(optimizer)
    params = [p for chunk in chunks for p in chunk.parameters()]
    out["optimizer_bytes"] = _storage_bytes(states)
    offload.offload(OPTIMIZER, GRADS)
    offload.offload(PARAMS)
    if with_offload:
        out["away"] = {"optimizer": _storage_bytes(states), "params": _storage_bytes(params),
                       "grads": _storage_bytes([b.grad_data for b in ddp_buffers(chunks)]),
                       "offloaded": offload.offloaded, "host_bytes": offload.events[-1]["host_bytes"]}
        with offload.resident():  # a checkpoint save in the middle of a rollout
            out["resident_params"] = _storage_bytes(params)
        out["after_resident"] = offload.offloaded
    offload.reload()
    out["grads_zero"] = all(bool((b.grad_data == 0).all()) for b in ddp_buffers(chunks))
    fake_grad_step(chunks, optimizer, scheduler, step=2)
    out["params"] = params_of(chunks)
    out["events"] = [e["event"] for e in offload.events]
    return out


def test_offload_and_reload_leave_training_unchanged():
    plain = run_distributed(case_offload, 2, False, timeout_s=180)
    moved = run_distributed(case_offload, 2, True, timeout_s=180)
    for rank in (0, 1):
        got, want = moved[rank], plain[rank]
        assert got["optimizer_bytes"] > 0  # Adam's state exists after the first step
        away = got["away"]
        assert away["optimizer"] == 0 and away["params"] == 0 and away["grads"] == 0, away
        assert away["offloaded"] == ("optimizer", "grads", "params")
        # on the host: Adam's two moments of this rank's shard (half of the params, distributed optimizer)
        # plus every parameter; the gradient buffers are dropped, not copied
        param_bytes = sum(p.numel() * 4 for p in want["params"].values())
        assert away["host_bytes"] >= param_bytes + got["optimizer_bytes"]
        assert got["resident_params"] > 0 and got["after_resident"] == ("optimizer", "grads", "params")
        assert got["grads_zero"]
        assert got["events"] == ["offload optimizer+grads", "offload params", "reload", "offload optimizer+grads+params",
                                 "reload"]
        assert set(got["params"]) == set(want["params"])
        for name, tensor in want["params"].items():
            assert torch.equal(got["params"][name], tensor), name


def case_reference(with_reference: bool) -> dict:
    """The policy, its optimizer and the frozen KL reference as the trainer builds them (build_policy,
    build_optimizer, build_policy(frozen=True)); the reference handed to TrainerOffload or not."""
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.offload import GRADS, OPTIMIZER, PARAMS, REFERENCE, TrainerOffload
    from maspo_megatron.trainer.optim import build_optimizer
    from maspo_megatron.trainer.setup import build_policy, build_tokenizer

    cfg = load_config(None, ["model.tiny_layers=1", "rollout.colocated_offload=true", "algorithm.kl_coef=0.05"])
    dims = init_distributed(cfg.parallel, seed=3)
    tokenizer = build_tokenizer(cfg)
    policy = build_policy(cfg, dims, tokenizer)
    optimizer = build_optimizer(cfg, policy.chunks)
    reference = build_policy(cfg, dims, tokenizer, frozen=True)
    tensors = [t for chunk in reference.chunks for t in (*chunk.parameters(), *chunk.buffers())]
    before = [t.detach().clone() for t in tensors]
    storages = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}
    offload = TrainerOffload(policy.chunks, optimizer, enabled=True, rank=dims.rank,
                             reference_chunks=reference.chunks if with_reference else ())
    offload.offload(OPTIMIZER, GRADS, REFERENCE)  # after the update, as trainer/loop.py does
    out = {"reference_bytes": sum(storages.values()), "away_bytes": _storage_bytes(tensors),
           "offloaded": offload.offloaded, "host_bytes": offload.events[-1]["host_bytes"]}
    offload.offload(PARAMS)
    offload.reload()
    out["restored"] = all(torch.equal(t, b) for t, b in zip(tensors, before, strict=True))
    out["events"] = [e["event"] for e in offload.events]
    return out


def test_the_kl_reference_leaves_the_device_with_the_optimizer_and_comes_back_unchanged():
    plain, = run_distributed(case_reference, 1, False, timeout_s=180)
    moved, = run_distributed(case_reference, 1, True, timeout_s=180)
    assert moved["reference_bytes"] > 0
    assert moved["away_bytes"] == 0 and moved["offloaded"] == ("optimizer", "grads", "reference")
    # copied to the host: exactly the reference's storages on top of what is moved without it
    assert moved["host_bytes"] - plain["host_bytes"] == moved["reference_bytes"]
    assert moved["restored"]
    assert moved["events"] == ["offload optimizer+grads+reference", "offload params", "reload"]
    # without reference chunks (no KL term, or kl_reference_offload keeping it on the host) it stays put
    assert plain["away_bytes"] == plain["reference_bytes"] and plain["offloaded"] == ("optimizer", "grads")
    assert plain["events"] == ["offload optimizer+grads", "offload params", "reload"] and plain["restored"]
