"""The device seam and the one forward step, on the policy the trainer builds.

- packed rows give the same log-probs as every sample alone in its own row (the attention
  backend keeps samples apart), through `pack_mini_batches` + `run_micro_batches`;
- everything a pass touches lives on `ParallelDims.device` (CPU here; the GPU variant runs the
  same case with the GPU visible);
- the process-group backend per device, and no trainer/algorithms module reaching for the CPU edge.
"""
import ast
from pathlib import Path

import pytest
import torch

from tests.helpers.multiproc import run_distributed

MODEL = ["model.hf_config=tiny", "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=4",
         "model.tiny_kv_heads=2", "model.tiny_ffn=64", "model.vocab_divisible_by=8", "model.dtype=fp32",
         "trainer.micro_batch_tokens=64", "algorithm.mini_batches=1"]


def _samples():
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(11)
    out = []
    for _ in range(9):
        prompt = torch.randint(1, 100, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        response = torch.randint(1, 100, (int(torch.randint(1, 12, (1,), generator=gen)),), generator=gen).tolist()
        out.append(TrainSample(prompt, response, 1.0, [0.0] * len(response)))
    return out


def _log_probs_by_sample(policy, cfg, dims, samples):
    """{sample index: fp64 log-probs of its response tokens} from the trainer's forward step."""
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy
    from maspo_megatron.trainer.forward import run_micro_batches
    from maspo_megatron.trainer.train_step import pack_mini_batches

    seen = []

    def record(batch, logits):
        assert logits.device == dims.device and batch.tokens.device == dims.device
        log_prob, _ = vocab_parallel_logprobs_entropy(logits, batch.target, dims.tp_group,
                                                      vocab_size=policy.meta.vocab_size)
        seen.append((batch.sample_index[batch.loss_mask].cpu(), log_prob[batch.loss_mask].double().cpu()))
        return torch.zeros((), device=logits.device), batch.local_token_count, {}

    batches = pack_mini_batches(samples, cfg, dims, policy.attention_backend)[0]
    with torch.no_grad():
        run_micro_batches(policy, batches, record, dims, forward_only=True)
    out = {}
    for index, values in seen:
        for sample_id in index.unique().tolist():
            out[sample_id] = values[index == sample_id]
    return out, len(batches)


def _packing_case(extra_overrides):
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.trainer.setup import build_policy, build_tokenizer

    cfg = load_config(None, MODEL + list(extra_overrides))
    dims = init_distributed(cfg.parallel, seed=3)
    policy = build_policy(cfg, dims, build_tokenizer(cfg))
    devices = {p.device for chunk in policy.chunks for p in chunk.parameters()}
    samples = _samples()
    packed, packed_batches = _log_probs_by_sample(policy, cfg, dims, samples)
    alone = {}
    for index, sample in enumerate(samples):
        by_sample, _ = _log_probs_by_sample(policy, cfg, dims, [sample])
        alone[index] = by_sample[0]
    destroy_distributed()
    return {"device": str(dims.device), "param_devices": sorted(str(d) for d in devices),
            "backend": policy.attention_backend, "packed_batches": packed_batches,
            "max_diff": max(float((packed[i] - alone[i]).abs().max()) for i in alone),
            "lengths_match": all(packed[i].numel() == len(samples[i].response_ids) for i in alone)}


@pytest.mark.parametrize("backend", ["dense", "packed"])
def test_packed_rows_equal_samples_alone_on_cpu(backend):
    """dense: the CPU block mask; packed: THD packed_seq_params through the GPU's attention module (SDPA per sample)."""
    result = run_distributed(_packing_case, 1, [f"model.attention={backend}"], timeout_s=240)[0]
    assert result["device"] == "cpu" and result["param_devices"] == ["cpu"]
    assert result["backend"] == backend
    assert result["packed_batches"] < 9  # several samples really shared rows
    assert result["lengths_match"]
    assert result["max_diff"] < 1e-5, result


@pytest.mark.gpu
def test_packed_rows_equal_samples_alone_on_gpu():
    result = run_distributed(_packing_case, 1, [], timeout_s=300, device="cuda")[0]
    assert result["device"].startswith("cuda") and all(d.startswith("cuda") for d in result["param_devices"])
    assert result["backend"] in ("te", "packed")  # never the O(S^2) mask on a GPU
    assert result["packed_batches"] < 9 and result["lengths_match"]
    assert result["max_diff"] < 1e-4, result


def test_process_group_backend_per_device():
    from maspo_megatron.parallel.device import process_group_backend

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert process_group_backend("auto", cuda) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("nccl", cuda) == "cpu:gloo,cuda:nccl"
    assert process_group_backend("gloo", cuda) == "gloo"
    assert process_group_backend("auto", cpu) == "gloo"
    with pytest.raises(ValueError, match=r"parallel\.backend: 'nccl' needs CUDA"):
        process_group_backend("nccl", cpu)


def test_only_the_device_module_reaches_the_cpu_edge():
    root = Path(__file__).resolve().parents[2] / "maspo_megatron"
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent.name == "cpu" or path.name == "device.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("maspo_megatron.parallel.cpu") for n in names):
                offenders.append(str(path.relative_to(root)))
    assert offenders == []


def _old_log_probs_case():
    """compute_old_log_probs writes the trainer's log-probs into the batches ppo_update reads."""
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.trainer.optim import build_optimizer
    from maspo_megatron.trainer.setup import build_policy, build_tokenizer
    from maspo_megatron.trainer.train_step import compute_old_log_probs, pack_mini_batches

    cfg = load_config(None, MODEL + ["algorithm.old_logprob_source=trainer"])
    dims = init_distributed(cfg.parallel, seed=3)
    policy = build_policy(cfg, dims, build_tokenizer(cfg))
    optimizer = build_optimizer(cfg, policy.chunks)
    samples = _samples()
    expected, _ = _log_probs_by_sample(policy, cfg, dims, samples)
    mini = pack_mini_batches(samples, cfg, dims, policy.attention_backend)
    engine = [mb.old_log_probs.clone() for mb in mini[0]]
    compute_old_log_probs(policy, mini, cfg, dims)
    worst = 0.0
    for batch, before in zip(mini[0], engine, strict=True):
        assert not torch.equal(batch.old_log_probs, before)  # written in place (the engine's were zeros)
        for sample_id in batch.sample_index[batch.loss_mask].unique().tolist():
            where = batch.loss_mask & (batch.sample_index == sample_id)
            worst = max(worst, float((batch.old_log_probs[where].double() - expected[sample_id]).abs().max()))
    out = {"worst": worst, "grad_scale_is_optimizers": policy.config.grad_scale_func == optimizer.scale_loss}
    destroy_distributed()
    return out


def test_old_log_probs_land_in_the_batches_the_update_reads():
    result = run_distributed(_old_log_probs_case, 1, timeout_s=240)[0]
    assert result["worst"] < 1e-6
    assert result["grad_scale_is_optimizers"]  # fp16 loss scaling reaches Megatron's schedule
