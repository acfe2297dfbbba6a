"""MASPO on the policy the trainer builds (`build_policy`, the tiny Qwen2-shaped model, padded
vocabulary) through the trainer's one forward step (`run_micro_batches`): loss, gradients,
statistics and one optimizer step are the same at every parallel layout (TP, PP, interleaved PP,
DP, sequence parallel, micro-batch count), fp32, 1e-5 relative.

Launch 1 (one process) builds the reference: TP1/PP1/DP1, ONE micro-batch, Megatron's schedule.
It also checks that reference against plain PyTorch: each sample run ALONE (no packing) through
the same weights, full-vocab log_softmax, policy_loss, global-batch normalisers, autograd.
Launch 2 (four processes) runs several layouts one after another in the same processes and
compares each with the reference, for all four aggregation modes.
"""
import math

import pytest
import torch

from maspo_megatron.algorithms import AGGREGATION_MODES
from tests.helpers.multiproc import run_distributed

# Excluded by name: "token-mean-microbatch" is the official MASPO normaliser, each micro-batch divided
# by its OWN token count, so its loss changes with the micro-batch cut by design (checked against the
# official formulas in tests/algorithms/test_official_maspo.py instead).
EXCLUDED_AGGREGATIONS = {"token-mean-microbatch": "layout-dependent by design (the official normaliser)"}
AGGREGATIONS = tuple(mode for mode in AGGREGATION_MODES if mode not in EXCLUDED_AGGREGATIONS)
ROW_TOKENS = 32
NORM_LENGTH = 16
SEED = 1234
# The tiny policy as the trainer builds it: 4 layers (pp2 x vpp2), 8 query / 4 key-value heads (GQA
# that TP4 can split), the tiny tokenizer's 103-token vocabulary padded to 128 at every TP (32 x tp).
MODEL = ["model.hf_config=tiny", "model.tiny_layers=4", "model.tiny_hidden=32", "model.tiny_heads=8",
         "model.tiny_kv_heads=4", "model.tiny_ffn=64", "model.vocab_divisible_by=32", "model.dtype=fp32",
         f"model.seed={SEED}"]
# Adam (the distributed optimizer supports only Adam) with eps far above |g|: the first update is
# lr * g / (|g| + eps), close to proportional to the gradient, so a gradient-scale error shows.
# The clip threshold is high enough not to bind (a binding clip would hide a uniform scale error),
# while clip_grads still computes the global grad norm over TP/PP/DP (the shim's Tensor.type path).
LR, CLIP, ADAM_EPS = 1.0, 1e3, 1.0


def _samples():
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(7)
    samples = []
    for index in range(12):
        prompt = torch.randint(1, 96, (int(torch.randint(2, 8, (1,), generator=gen)),), generator=gen).tolist()
        response = torch.randint(1, 96, (int(torch.randint(2, 14, (1,), generator=gen)),), generator=gen).tolist()
        if index == 5:
            response = response[:1]
        advantage = float(torch.randn((), generator=gen)) * 1.5
        samples.append(TrainSample(prompt, response, advantage))
    return samples


def _settings(mode):
    from maspo_megatron.config import AlgorithmConfig
    from maspo_megatron.data import build_tiny_tokenizer
    from maspo_megatron.trainer.loss import LossSettings

    algorithm = AlgorithmConfig(aggregation=mode, norm_length=NORM_LENGTH)
    algorithm.maspo.alpha = 0.5
    # the padded vocabulary columns (103 -> 128) stay out of the softmax, as in the trainer
    return LossSettings.from_config(algorithm, vocab_size=len(build_tiny_tokenizer()))


def _pack(samples, dims, micro_batches):
    from maspo_megatron.trainer.batch import pack_micro_batches

    rows = pack_micro_batches(samples, row_tokens=ROW_TOKENS, rows_per_micro_batch=1000, dp_size=dims.dp)
    rows_per_rank = max(b.tokens.shape[0] for b in (per_rank[0] for per_rank in rows))
    per_mb = -(-rows_per_rank // micro_batches)
    packed = pack_micro_batches(samples, row_tokens=ROW_TOKENS, rows_per_micro_batch=per_mb, dp_size=dims.dp,
                                row_multiple=dims.tp, fixed_row_len=True, min_micro_batches=micro_batches)
    return packed[dims.dp_rank]


def _setup(tp, pp, sp, distributed_optimizer, full_state=None, vpp=None):
    """(dims, policy) from the trainer's own builders; full_state (TP1/PP1 tensors) loaded into the shards."""
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.setup import build_policy, build_tokenizer
    from tests.helpers.tiny_gpt import load_full_state_dict

    layout = [f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.sequence_parallel={str(sp).lower()}",
              f"parallel.distributed_optimizer={str(distributed_optimizer).lower()}"] + ([f"parallel.vpp={vpp}"] if vpp else [])
    cfg = load_config(None, MODEL + layout)
    dims = init_distributed(cfg.parallel, seed=SEED)
    policy = build_policy(cfg, dims, build_tokenizer(cfg))
    assert policy.attention_backend == "dense"  # CPU: the block mask path
    if full_state is not None:
        load_full_state_dict(policy.chunks, full_state, dims.tp_rank, dims.tp)
    return dims, policy


def _train_step(dims, policy, micro_batches, settings):
    from functools import partial

    from maspo_megatron.parallel.metrics import reduce_sums
    from maspo_megatron.trainer.forward import run_micro_batches
    from maspo_megatron.trainer.loss import finalize_metrics, megatron_loss_func

    for chunk in policy.chunks:
        chunk.zero_grad_buffer()
    loss_fn = partial(megatron_loss_func, settings=settings, dims=dims, num_microbatches=len(micro_batches))
    losses = run_micro_batches(policy, micro_batches, loss_fn, dims, forward_only=False)
    return finalize_metrics(reduce_sums(losses, dims))


def _optimizer(chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(optimizer="adam", lr=LR, adam_eps=ADAM_EPS, weight_decay=0.0, clip_grad=CLIP,
                             use_distributed_optimizer=True, params_dtype=torch.float32)
    return get_megatron_optimizer(config, chunks)


def _plain_torch_reference(policy, samples, settings):
    """Loss and grads with each sample alone through the model and log_softmax over the real vocabulary."""
    from maspo_megatron.algorithms import aggregate_loss, policy_loss
    from tests.helpers.tiny_gpt import local_grads

    chunks, vocab_size = policy.chunks, policy.meta.vocab_size
    model = chunks[0]
    model.zero_grad_buffer()
    total_tokens = sum(len(s.response_ids) for s in samples)
    counts = torch.tensor([len(s.response_ids) for s in samples])
    loss = 0.0
    for index, sample in enumerate(samples):
        ids = torch.tensor([list(sample.prompt_ids) + list(sample.response_ids)])
        length, p = ids.shape[1], len(sample.prompt_ids)
        mask = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)[None, None]
        logits = model(ids, torch.arange(length)[None], mask)[0, p - 1:length - 1, :vocab_size].float()
        log_prob = torch.log_softmax(logits, -1).gather(1, ids[0, p:, None]).squeeze(1)[None]
        ones = torch.ones_like(log_prob, dtype=torch.bool)
        old = torch.tensor(sample.old_log_probs)[None]
        adv = torch.full_like(log_prob, float(sample.advantage))
        loss_tok, _ = policy_loss(settings.loss, log_prob, old, adv, ones, **settings.hyper)
        loss = loss + aggregate_loss(
            loss_tok, ones, settings.aggregation, global_token_count=total_tokens,
            global_sample_count=len(samples), sample_index=torch.full_like(ones, index, dtype=torch.long),
            sample_token_count=counts, norm_length=settings.norm_length)
    loss.backward()
    # DDP hooks accumulate into main_grad; read it like the Megatron path does.
    return float(loss), local_grads(chunks)


def _reference_case():
    import dataclasses

    from maspo_megatron.parallel import destroy_distributed
    from tests.helpers.tiny_gpt import local_grads, named_local_params

    dims, policy = _setup(1, 1, False, False)
    chunks = policy.chunks
    full_state = {name: param.detach().clone() for name, param in named_local_params(chunks)}
    samples = _samples()
    # Old log-probs: the current policy's, perturbed, so that MASPO's gate acts on some tokens.
    with torch.no_grad():
        batch = _pack(samples, dims, 1)[0]
        from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

        logits = chunks[0](batch.tokens, batch.position_ids, batch.attention_mask())[..., :policy.meta.vocab_size]
        log_prob, _ = vocab_parallel_logprobs_entropy(logits, batch.target)
    gen = torch.Generator().manual_seed(3)
    for index, sample in enumerate(samples):
        where = batch.loss_mask & (batch.segment_ids == index)
        noise = torch.randn(int(where.sum()), generator=gen) * 0.4
        sample.old_log_probs = (log_prob[where] + noise).tolist()
    out = {"full_state": full_state, "samples": samples, "modes": {}}
    micro_batches = _pack(samples, dims, 1)
    for mode in AGGREGATIONS:
        settings = _settings(mode)
        metrics = _train_step(dims, policy, micro_batches, settings)
        grads = local_grads(chunks)
        plain_loss, plain_grads = _plain_torch_reference(policy, samples, settings)
        out["modes"][mode] = {"metrics": metrics, "grads": grads, "plain_loss": plain_loss,
                              "plain_grad_err": max(_rel(plain_grads[k], grads[k]) for k in grads)}
    destroy_distributed(keep_process_group=True)
    dims, policy = _setup(1, 1, False, True, full_state)
    _train_step(dims, policy, micro_batches, _settings("token-mean"))
    _optimizer(policy.chunks).step()
    out["after_step"] = {name: param.detach().clone() for name, param in named_local_params(policy.chunks)}
    out["settings"] = dataclasses.asdict(_settings("token-mean"))
    destroy_distributed()
    return out


def _rel(value, ref):
    return float((value.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def _metric_err(metrics, ref):
    assert set(metrics) == set(ref), set(metrics) ^ set(ref)
    worst = 0.0
    for key, expected in ref.items():
        got = metrics[key]
        if math.isnan(expected):
            assert math.isnan(got), key
            continue
        worst = max(worst, abs(got - expected) / max(abs(expected), 1e-6))
    return worst


LAYOUTS = [  # (name, tp, pp, sequence_parallel, micro_batches, vpp)
    ("tp2xpp2_sp_mb4", 2, 2, True, 4, None),
    ("tp2xdp2_mb1", 2, 1, False, 1, None),
    ("pp2xdp2_mb4", 1, 2, False, 4, None),
    ("tp4_sp_mb4", 4, 1, True, 4, None),
    # Interleaved schedule: rank r, virtual stage v holds global chunk v*pp + r (layers 1,3 | 2,4).
    # Its gradients are right only with Megatron's unbatched p2p mode at pp = 2, which
    # build_policy sets through parallel/pipeline.py (see that module).
    ("pp2xvpp2xdp2_mb4", 1, 2, False, 4, 2),
]


def _layouts_case(reference, only=None):
    import torch.distributed as dist

    from maspo_megatron.parallel import destroy_distributed
    from tests.helpers.tiny_gpt import local_grads, local_slice_of, named_local_params

    results = {}
    for name, tp, pp, sp, micro_batches, vpp in LAYOUTS:
        if only is not None and name not in only:
            continue
        dims, policy = _setup(tp, pp, sp, False, reference["full_state"], vpp)
        chunks = policy.chunks
        batches = _pack(reference["samples"], dims, micro_batches)
        assert len(batches) == micro_batches
        errors = {}
        for mode in AGGREGATIONS:
            ref = reference["modes"][mode]
            metrics = _train_step(dims, policy, batches, _settings(mode))
            ref_grads = local_slice_of(chunks, ref["grads"], dims.tp_rank, dims.tp)
            grads = local_grads(chunks)
            errors[f"{mode}/grad"] = max(_rel(grads[k], ref_grads[k]) for k in grads)
            if metrics is not None:
                errors[f"{mode}/metrics"] = _metric_err(metrics, ref["metrics"])
        destroy_distributed(keep_process_group=True)
        dims, policy = _setup(tp, pp, sp, True, reference["full_state"], vpp)
        chunks = policy.chunks
        _train_step(dims, policy, batches, _settings("token-mean"))
        _optimizer(chunks).step()
        after = local_slice_of(chunks, reference["after_step"], dims.tp_rank, dims.tp)
        before = local_slice_of(chunks, reference["full_state"], dims.tp_rank, dims.tp)
        params = dict(named_local_params(chunks))
        # The parameters themselves (per tensor), and the update over all local tensors together
        # (sensitive to any gradient-scale error; per-tensor updates of norm weights are tiny).
        errors["step/params"] = max(_rel(param.detach(), after[k]) for k, param in params.items())
        update = torch.cat([(param.detach() - before[k]).flatten() for k, param in params.items()])
        ref_update = torch.cat([(after[k] - before[k]).flatten() for k in params])
        errors["step/update"] = _rel(update, ref_update)
        results[name] = errors
        dist.barrier()
        destroy_distributed(keep_process_group=True)
    return results


@pytest.fixture(scope="module")
def reference():
    return run_distributed(_reference_case, 1, timeout_s=240)[0]


def test_reference_matches_plain_pytorch_per_sample(reference):
    for mode, ref in reference["modes"].items():
        assert ref["plain_grad_err"] < 1e-5, mode
        assert abs(ref["metrics"]["train/loss"] - ref["plain_loss"]) <= 1e-5 * abs(ref["plain_loss"]), mode
    # the gate acted (old log-probs differ from current ones), so MASPO is not plain PG here
    metrics = reference["modes"]["token-mean"]["metrics"]
    assert metrics["maspo/gated_pos_frac"] + metrics["maspo/gated_neg_frac"] > 0.05
    assert metrics["maspo/token_count"] == sum(len(s.response_ids) for s in reference["samples"])


def test_layouts_match_reference(reference):
    results = run_distributed(_layouts_case, 4, reference, timeout_s=420)
    for rank, per_layout in enumerate(results):
        assert set(per_layout) == {layout[0] for layout in LAYOUTS}
        for layout, errors in per_layout.items():
            assert "step/params" in errors and "step/update" in errors
            for key, value in errors.items():
                assert value < 1e-5, f"rank {rank} {layout} {key}: relative error {value:.2e}"
    assert all(f"{mode}/metrics" in results[0][name] for name, *_ in LAYOUTS for mode in AGGREGATIONS)
