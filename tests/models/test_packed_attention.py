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

VOCAB = 97
# Lengths of the packed samples (prompt, response); sample_multiple=4 pads some of them inside
# their segment and fixed_row_len adds a padding run at the end of the row.
SAMPLE_SHAPES = ((3, 6), (2, 1), (5, 9), (1, 3), (4, 4))
ROW_TOKENS = 48


def _reference_attention(q, k, v, lengths, scale, left):
    """float64 causal attention per segment, written out: q[T, Hq, D], k/v[T, Hkv, D] -> [T, Hq, D]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    start = 0
    for length in lengths:
        for i in range(start, start + length):
            first = start if left < 0 else max(start, i - left)
            for head in range(q.shape[1]):
                keys = k[first:i + 1, head // groups]
                scores = (keys @ q[i, head]) * scale
                weights = torch.exp(scores - scores.max())
                out[i, head] = (weights / weights.sum()) @ v[first:i + 1, head // groups]
        start += length
    return out


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
    ref = _reference_attention(q64, k64, v64, lengths, 0.3, -1 if window is None else window[0])
    (ref * grad_out.double()).sum().backward()
    for name, actual, expected in zip(("out", "dq", "dk", "dv"), got, [ref.detach(), q64.grad, k64.grad, v64.grad],
                                      strict=True):
        assert torch.allclose(actual.double(), expected, rtol=1e-5, atol=1e-6), name


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


def _samples():
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(11)
    return [TrainSample(torch.randint(1, VOCAB, (p,), generator=gen).tolist(),
                        torch.randint(1, VOCAB, (r,), generator=gen).tolist(), 1.0) for p, r in SAMPLE_SHAPES]


def _backward(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _packed_vs_alone_case(tp: int, window) -> dict:
    """Packed THD row vs dense block mask vs each sample alone, on this TP rank's shards."""
    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.packed_attention import PackedDotProductAttention, thd_packed_seq_params
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.batch import pack_micro_batches

    parallel = ParallelConfig(tp=tp)
    init_distributed(parallel, seed=3)
    model_cfg = ModelConfig(tiny_layers=2, tiny_hidden=64, tiny_heads=4, tiny_kv_heads=2, tiny_ffn=96)
    config, meta = build_model_config("tiny", model_cfg, parallel, vocab_size=VOCAB)
    config.window_size = window
    packed_model = gpt_model_provider(config, meta, backend="packed")
    dense_model = gpt_model_provider(config, meta, backend="dense")
    dense_model.load_state_dict(packed_model.state_dict())
    assert isinstance(packed_model.decoder.layers[0].self_attention.core_attention, PackedDotProductAttention)
    assert not isinstance(dense_model.decoder.layers[0].self_attention.core_attention, PackedDotProductAttention)

    samples = _samples()
    (batches,) = pack_micro_batches(samples, row_tokens=ROW_TOKENS, sample_multiple=4, fixed_row_len=True)
    (batch,) = batches
    cu = batch.cu_seqlens(0)
    weights = torch.randn(ROW_TOKENS, packed_model.output_layer.weight.shape[0],
                          generator=torch.Generator().manual_seed(5 + torch.distributed.get_rank() % tp))
    starts = {int(batch.segment_ids[0, cu[i]]): int(cu[i]) for i in range(len(cu) - 1) if batch.segment_ids[0, cu[i]] >= 0}
    # the loss reads the samples' own tokens: not their padding (sample_multiple), not the row's padding run
    real = torch.zeros(ROW_TOKENS, dtype=torch.bool)
    for index, sample in enumerate(samples):
        real[starts[index]:starts[index] + len(sample)] = True

    logits = packed_model(batch.tokens, batch.position_ids, None, packed_seq_params=thd_packed_seq_params(cu))[0]
    packed = (logits.detach(), _backward(packed_model, (logits[real] * weights[real]).sum()))
    logits = dense_model(batch.tokens, batch.position_ids, batch.attention_mask())[0]
    dense = (logits.detach(), _backward(dense_model, (logits[real] * weights[real]).sum()))

    alone_logits = torch.zeros_like(logits)
    alone_loss = 0.0
    for index, sample in enumerate(samples):
        ids = torch.tensor([*sample.prompt_ids, *sample.response_ids])[None]
        length, start = ids.shape[1], starts[index]
        causal = ~torch.ones(length, length, dtype=torch.bool).tril()[None, None]
        out = dense_model(ids, torch.arange(length)[None], None if window else causal)[0]
        alone_logits[start:start + length] = out.detach()
        alone_loss = alone_loss + (out * weights[start:start + length]).sum()
    alone = (alone_logits, _backward(dense_model, alone_loss))
    return {"packed": packed, "dense": dense, "alone": alone, "real": real}


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("tp,window", [(1, None), (2, None), (1, (3, 0))])
def test_packed_spec_equals_each_sample_alone_and_dense_mask(tp, window):
    results = run_distributed(_packed_vs_alone_case, tp, tp, window, timeout_s=300)
    for result in results:
        tokens = result["real"]
        packed_logits, packed_grads = result["packed"]
        alone_logits, alone_grads = result["alone"]
        dense_logits, dense_grads = result["dense"]
        assert _relative(packed_logits[tokens], alone_logits[tokens]) < 1e-5
        # sliding windows: the local spec replaces any given mask with its own (fused_softmax.py),
        # so the dense block mask is only a reference without a window
        comparisons = [("alone", alone_grads)] if window else [("alone", alone_grads), ("dense", dense_grads)]
        if not window:
            assert _relative(packed_logits[tokens], dense_logits[tokens]) < 1e-5
        for label, reference in comparisons:
            assert packed_grads.keys() == reference.keys()
            for name, grad in packed_grads.items():
                assert _relative(grad, reference[name]) < 1e-5, (label, name)


def test_attention_backend_and_parallel_refusals():
    from maspo_megatron.config import ParallelConfig
    from maspo_megatron.models.fp8 import transformer_engine_usable
    from maspo_megatron.models.provider import attention_backend, check_attention_parallel

    expected = "te" if transformer_engine_usable() else ("packed" if torch.cuda.is_available() else "dense")
    assert attention_backend() == expected
    assert attention_backend(use_te=True) == "te"
    assert attention_backend(use_te=False) in ("packed", "dense")
    check_attention_parallel(ParallelConfig(cp=2, tp=2, sequence_parallel=True), use_te=True)
    with pytest.raises(ValueError, match=r"^parallel\.cp: 2 needs Transformer Engine"):
        check_attention_parallel(ParallelConfig(cp=2), use_te=False)
    sp = ParallelConfig(tp=2, sequence_parallel=True)
    if attention_backend(use_te=False) == "packed":
        with pytest.raises(ValueError, match=r"^parallel\.sequence_parallel: needs Transformer Engine"):
            check_attention_parallel(sp, use_te=False)
    else:
        check_attention_parallel(sp, use_te=False)  # the CPU shim's SP-aware norm keeps SP testable
