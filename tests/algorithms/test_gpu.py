"""On CUDA: every loss, the aggregation and the statistics give the CPU results (bf16 inputs too)."""
from __future__ import annotations

import pytest
import torch

from maspo_megatron.algorithms import POLICY_LOSSES, aggregate_loss, maspo_statistics, policy_loss
from tests.algorithms._runtime import runtime_inputs


def _batch(device, dtype):
    gen = torch.Generator().manual_seed(0)
    old = -torch.empty(16, 256).exponential_(0.5, generator=gen)
    log_prob = old + 0.5 * torch.randn(16, 256, generator=gen)
    adv = torch.randn(16, 1, generator=gen).expand(16, 256).contiguous()
    mask = torch.rand(16, 256, generator=gen) < 0.8
    return [t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype) for t in (log_prob, old, adv, mask)]


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(POLICY_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(name, dtype):
    results = {}
    for device in ("cpu", "cuda"):
        log_prob, old, adv, mask = _batch(device, dtype)
        log_prob.requires_grad_()
        loss, _ = policy_loss(name, log_prob, old, adv, mask, **runtime_inputs(name, log_prob))
        assert loss.dtype == torch.float32 and loss.device.type == device
        total = aggregate_loss(loss, mask, "token-mean", global_token_count=int(mask.sum()))
        total.backward()
        results[device] = (loss.detach().cpu(), log_prob.grad.float().cpu(), total.detach().cpu())
    for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
        torch.testing.assert_close(cuda, cpu, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_statistics_match_cpu():
    sums = {device: maspo_statistics(*_batch(device, torch.bfloat16)) for device in ("cpu", "cuda")}
    for key, value in sums["cpu"].items():
        torch.testing.assert_close(sums["cuda"][key].cpu(), value, rtol=1e-5, atol=1e-4)
