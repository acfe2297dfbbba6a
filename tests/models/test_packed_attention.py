"""Packed-row attention without Transformer Engine (models/packed_attention.py, the "packed" spec).

1. The kernel against a float64 reference written here (loops over segments, explicit softmax):
   outputs and input gradients, grouped-query attention, sliding windows.
2. A tiny GPTModel from the project's builders (build_model_config + gpt_model_provider) at TP1
   and TP2 (gloo): the packed spec on ONE THD row equals Megatron's local spec running every
   sample ALONE, and the local spec on the same row with the dense block mask, for the logits and
   every parameter gradient (RoPE restarts per sample through Megatron's THD rotary path).
3. The backend decision and the SP / CP refusals.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers.multiproc import run_distributed
from tests.models._packed_cases import assert_packed_matches, packed_vs_alone_case, reference_attention


@pytest.mark.parametrize("window", [None, (2, 0), (-1, 0)])
def test_packed_kernel_matches_float64_reference(window):
    from maspo_megatron.models.packed_attention import choose_kernel, packed_causal_attention

    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 7, 3, 4]
    total, heads, kv_heads, dim = sum(lengths), 4, 2, 8
    q, k, v = (torch.randn(total, h, dim, generator=gen, requires_grad=True) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    grad_out = torch.randn(total, heads, dim, generator=gen)
    assert choose_kernel(q.device, q.dtype, window) == "sdpa"

    out = packed_causal_attention(q, k, v, cu, max(lengths), scale=0.3, window=window)
    (out * grad_out).sum().backward()
    got = [out.detach(), q.grad, k.grad, v.grad]

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, lengths, 0.3, -1 if window is None else window[0])
    (ref * grad_out.double()).sum().backward()
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), got, [ref.detach(), q64.grad, k64.grad, v64.grad],
                                      strict=True):
        assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-6), name


def test_available_kernels_are_what_this_torch_build_has():
    from maspo_megatron.models.packed_attention import KERNELS, available_kernels, choose_kernel

    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
        has_varlen = True
    except ImportError:
        has_varlen = False
    kernels = available_kernels()
    assert kernels[-1] == "sdpa" and set(kernels) <= set(KERNELS)  # the fallback is always there
    assert ("varlen" in kernels) == has_varlen
    assert choose_kernel(torch.device("cpu"), torch.bfloat16) == "sdpa"  # CPU: present or not, sdpa runs


def test_packed_kernel_refuses_bad_input():
    from maspo_megatron.models.packed_attention import packed_causal_attention

    q, k = torch.zeros(6, 4, 8), torch.zeros(6, 3, 8)
    cu = torch.tensor([0, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="Hkv dividing Hq"):
        packed_causal_attention(q, k, k, cu, 6)
    with pytest.raises(ValueError, match="window_size"):
        packed_causal_attention(q, q, q, cu, 6, window=(2, 1))
    with pytest.raises(ValueError, match="kernel 'nope'"):
        packed_causal_attention(q, q, q, cu, 6, kernel="nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU path (gloo + the CPU shim, which stays off where CUDA is); "
                    "test_packed_attention_gpu.py runs the same check on CUDA")
@pytest.mark.parametrize("tp,window", [(1, None), (2, None), (1, (3, 0))])
def test_packed_spec_equals_each_sample_alone_and_dense_mask(tp, window):
    results = run_distributed(packed_vs_alone_case, tp, tp, window, timeout_s=300)
    assert_packed_matches(results, window, tolerance=1e-5)


def test_attention_backend_and_parallel_refusals():
    from maspo_megatron.config import ParallelConfig
    from maspo_megatron.models.fp8 import transformer_engine_usable
    from maspo_megatron.models.provider import attention_backend, check_attention_parallel

    expected = "te" if transformer_engine_usable() else ("packed" if torch.cuda.is_available() else "dense")
    assert attention_backend() == expected
    assert attention_backend(use_te=True) == "te"
    assert attention_backend(use_te=False) in ("packed", "dense")
    assert attention_backend(use_te=False, choice="packed") == "packed"  # also on the CPU (tests)
    with pytest.raises(ValueError, match=r"^model\.attention: 'te' needs Transformer Engine"):
        attention_backend(use_te=False, choice="te")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^model\.attention: 'dense' is the CPU fallback"):
            attention_backend(use_te=False, choice="dense")
    check_attention_parallel(ParallelConfig(cp=2, tp=2, sequence_parallel=True), "te")
    for backend in ("packed", "dense"):
        with pytest.raises(ValueError, match=r"^parallel\.cp: 2 needs Transformer Engine"):
            check_attention_parallel(ParallelConfig(cp=2), backend)
    sp = ParallelConfig(tp=2, sequence_parallel=True)
    with pytest.raises(ValueError, match=r"^parallel\.sequence_parallel: needs Transformer Engine"):
        check_attention_parallel(sp, "packed")
    check_attention_parallel(sp, "dense")  # the CPU shim's SP-aware norm keeps SP testable


def test_packed_attention_refuses_what_it_does_not_implement():
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from maspo_megatron.models.packed_attention import PackedDotProductAttention

    def build(mask=AttnMaskType.causal, **overrides):
        config = TransformerConfig(**{"num_layers": 1, "hidden_size": 32, "num_attention_heads": 4,
                                      "attention_dropout": 0.0, **overrides})
        return PackedDotProductAttention(config, 1, mask, "self")

    with pytest.raises(ValueError, match=r"^parallel\.cp: 2 needs Transformer Engine"):
        build(context_parallel_size=2)
    with pytest.raises(ValueError, match=r"^attention_dropout: 0\.1"):
        build(attention_dropout=0.1)
    with pytest.raises(ValueError, match=r"^attn_mask_type: .* not causal"):
        build(mask=AttnMaskType.padding)


# varlen_attn's parameters in the torch releases the product meets (read from their sources /
# GPU_NOTES.md): 2.9/2.10 have is_causal, 2.11 window_size without enable_gqa, 2.13 all of them.
_VARLEN_SIGNATURES = {
    "2.10": frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "return_aux"}),
    "2.11": frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux", "scale",
                       "window_size"}),
    "2.13": frozenset({"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "return_aux", "scale",
                       "window_size", "enable_gqa", "seqused_k", "block_table", "num_splits"}),
}


@pytest.mark.parametrize("release", sorted(_VARLEN_SIGNATURES))
@pytest.mark.parametrize("window", [None, (2, 0)])
def test_varlen_arguments_keep_the_attention_for_every_signature(release, window):
    """The adapted (q, k, v, kwargs), read with flash-attention's documented semantics (default
    scale 1/sqrt(D), window (left, right), GQA only with enable_gqa), give the wanted attention."""
    from maspo_megatron.models.packed_attention import varlen_arguments

    params = _VARLEN_SIGNATURES[release]
    gen = torch.Generator().manual_seed(1)
    lengths = [4, 6]
    q, k, v = (torch.randn(10, h, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    if release == "2.10" and window is not None:
        with pytest.raises(ValueError, match=r"^window_size: \(2, 0\) needs a varlen_attn with window_size"):
            varlen_arguments(params, q, k, v, 0.3, window)
        return
    q2, k2, v2, kwargs = varlen_arguments(params, q, k, v, 0.3, window)
    assert set(kwargs) <= params
    if not kwargs.get("enable_gqa"):
        assert k2.shape[1] == q2.shape[1]
    left = kwargs["window_size"][0] if "window_size" in kwargs else (-1 if kwargs["is_causal"] else None)
    assert left is not None and kwargs.get("window_size", (left, 0))[1] == 0
    got = reference_attention(q2, k2, v2, lengths, kwargs.get("scale", 8 ** -0.5), left)
    want = reference_attention(q, k, v, lengths, 0.3, -1 if window is None else window[0])
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_sliding_window_models_get_the_packed_attention_on_every_torch_backend():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from maspo_megatron.models.meta import model_meta
    from maspo_megatron.models.packed_attention import PackedDotProductAttention
    from maspo_megatron.models.provider import layer_spec
    from tests.helpers.hf_models import hf_config

    def core_attention(meta, backend):
        return layer_spec(meta, backend=backend).submodules.self_attention.submodules.core_attention

    windowed = hf_config("qwen2").to_dict() | {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}
    meta = model_meta(windowed)
    assert meta.attention_window == (3, 0)
    assert core_attention(meta, "dense") is PackedDotProductAttention
    assert core_attention(meta, "packed") is PackedDotProductAttention
    plain = model_meta(hf_config("qwen2"))
    assert plain.attention_window is None
    assert core_attention(plain, "dense") is DotProductAttention
    with pytest.raises(ValueError, match="backend 'flash' is not one of"):
        layer_spec(plain, backend="flash")
