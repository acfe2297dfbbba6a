"""Blockwise FP8 e4m3: error within the format's rounding bound, layout of HF FP8 checkpoints."""
import math

import pytest
import torch

from maspo_megatron.rollout.weight_sync.fp8 import (
    dequantize_blockwise,
    fp8_stream,
    quantize_blockwise,
    should_quantize,
)

# e4m3: 3 mantissa bits -> relative rounding error <= 2^-4 for normal values; below the smallest
# normal (2^-6) the spacing is 2^-9, so absolute error <= 2^-10 (times the block scale).
REL_BOUND = 2.0 ** -4
SUBNORMAL_ABS_BOUND = 2.0 ** -10


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (1, 129), (257, 1), (64, 96)])
def test_quantize_dequantize_error_within_e4m3_bounds(shape):
    gen = torch.Generator().manual_seed(sum(shape))
    weight = torch.randn(*shape, generator=gen) * torch.logspace(-4, 1, shape[1])  # wide dynamic range per row
    weight = weight.to(torch.bfloat16)
    w_fp8, scale_inv = quantize_blockwise(weight)
    assert w_fp8.dtype == torch.float8_e4m3fn and w_fp8.shape == weight.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    restored = dequantize_blockwise(w_fp8, scale_inv)
    exact = weight.float()
    scale_full = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    bound = exact.abs() * REL_BOUND + scale_full * SUBNORMAL_ABS_BOUND + 1e-12
    assert ((restored - exact).abs() <= bound).all()
    # each block's largest magnitude lands on e4m3's largest finite value (448) before scaling
    assert torch.allclose(w_fp8.float().abs().amax(), torch.tensor(448.0))


def test_zero_block_and_scale_semantics():
    weight = torch.zeros(130, 130)
    weight[129, 129] = 3.5  # only the last (1 x 1) edge block is non-zero
    w_fp8, scale_inv = quantize_blockwise(weight)
    assert scale_inv[1, 1] == pytest.approx(3.5 / 448)
    assert scale_inv[0, 0] == 1.0
    assert w_fp8.float()[129, 129] == 448.0
    assert dequantize_blockwise(w_fp8, scale_inv)[129, 129] == pytest.approx(3.5)
    assert dequantize_blockwise(w_fp8, scale_inv)[:128, :128].abs().sum() == 0


def test_which_tensors_are_quantized():
    w2 = torch.zeros(4, 4)
    assert should_quantize("model.layers.0.self_attn.q_proj.weight", w2)
    assert should_quantize("model.layers.3.mlp.down_proj.weight", w2)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight",
                 "model.norm.weight", "model.layers.0.mlp.gate.weight"):
        assert not should_quantize(name, w2), name
    assert not should_quantize("model.layers.0.self_attn.q_proj.bias", torch.zeros(4))
    assert not should_quantize("model.layers.0.self_attn.q_norm.weight", torch.zeros(4))


def test_stream_pairs_weight_with_scale_in_one_group():
    items = [
        ("model.embed_tokens.weight", torch.randn(10, 8).bfloat16(), None),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8).bfloat16(), "qkv0"),
        ("model.layers.0.self_attn.k_proj.weight", torch.randn(4, 8).bfloat16(), "qkv0"),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(8, 16).bfloat16(), None),
    ]
    out = list(fp8_stream(items))
    names = [n for n, _, _ in out]
    assert names == ["model.embed_tokens.weight",
                     "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight_scale_inv",
                     "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.k_proj.weight_scale_inv",
                     "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert out[0][1].dtype == torch.bfloat16
    assert [k for _, _, k in out[1:5]] == ["qkv0"] * 4
    assert out[5][2] is not None and out[5][2] == out[6][2]
