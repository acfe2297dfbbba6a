"""The packed-row attention on CUDA: torch's varlen (flash) and FlexAttention kernels against the
float64 reference, and the packed spec (bf16: varlen; fp32: SDPA per sample) against every sample
alone through Megatron's local spec. One process, one GPU (TP2 runs on the CPU suite)."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.multiproc import run_distributed
from tests.models._packed_cases import assert_packed_matches, packed_vs_alone_case, reference_attention

pytestmark = pytest.mark.gpu

LENGTHS = [100, 37, 300, 1, 74]  # one row of 512 tokens, a 1-token segment included


def _kernels():
    from maspo_megatron.models.packed_attention import available_kernels

    return list(available_kernels())


@pytest.mark.parametrize("window", [None, (63, 0)])
@pytest.mark.parametrize("cu_device", ["cuda", "cpu"])
def test_cuda_kernels_match_float64_reference(window, cu_device):
    from maspo_megatron.models.packed_attention import choose_kernel, packed_causal_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    total, heads, kv_heads, dim = sum(LENGTHS), 12, 2, 128  # Qwen2.5-1.5B's attention shape
    q, k, v = (torch.randn(total, h, dim, generator=gen, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (heads, kv_heads, kv_heads))
    grad_out = torch.randn(total, heads, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32, device=cu_device)
    assert choose_kernel(q.device, q.dtype, window) in ("varlen", "flex")
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, LENGTHS, dim ** -0.5, -1 if window is None else window[0])
    (ref * grad_out.double()).sum().backward()
    expected = [ref.detach(), q64.grad, k64.grad, v64.grad]
    # FlexAttention compiles per window (tens of seconds): once is enough
    kernels = [k for k in _kernels() if k != "flex" or (window is None and cu_device == "cuda")]
    for kernel in kernels:
        q.grad = k.grad = v.grad = None
        out = packed_causal_attention(q, k, v, cu, max(LENGTHS), window=window, kernel=kernel)
        (out.float() * grad_out.float()).sum().backward()
        for name, actual, want in zip(("out", "dq", "dk", "dv"), [out, q.grad, k.grad, v.grad], expected, strict=True):
            error = float((actual.double() - want).abs().max() / want.abs().max())
            assert error < 4e-2, (kernel, name, error)  # bf16 noise; a leak is O(1)


@pytest.mark.parametrize("dtype,tolerance", [("fp32", 1e-4), ("bf16", 5e-2)])
@pytest.mark.parametrize("cu_device", ["cuda", "cpu"])
def test_packed_spec_on_cuda_equals_each_sample_alone(dtype, tolerance, cu_device):
    results = run_distributed(packed_vs_alone_case, 1, 1, None, "cuda", dtype, cu_device, timeout_s=300)
    assert_packed_matches(results, None, tolerance)


def test_packed_spec_on_cuda_sliding_window():
    results = run_distributed(packed_vs_alone_case, 1, 1, (3, 0), "cuda", "bf16", "cuda", timeout_s=300)
    assert_packed_matches(results, (3, 0), 5e-2)


def test_attention_backend_on_cuda_without_te():
    from maspo_megatron.models.fp8 import transformer_engine_usable
    from maspo_megatron.models.packed_attention import available_kernels, choose_kernel
    from maspo_megatron.models.provider import attention_backend

    assert attention_backend() == ("te" if transformer_engine_usable() else "packed")
    if "varlen" in available_kernels():  # torch >= 2.9: the flash varlen kernel serves bf16 packed rows
        assert choose_kernel(torch.device("cuda"), torch.bfloat16) == "varlen"
