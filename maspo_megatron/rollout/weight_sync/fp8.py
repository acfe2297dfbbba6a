"""Blockwise FP8 (e4m3) quantization of linear weights, in the HF FP8 checkpoint layout SGLang loads.

Layout (DeepSeek-V3 / Qwen3-FP8 style, `quantization_config = {"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}`):
    `<prefix>.weight`            w_fp8[N, K]  float8_e4m3fn
    `<prefix>.weight_scale_inv`  scale[ceil(N/128), ceil(K/128)]  float32
and the engine dequantizes `w[i, j] = w_fp8[i, j] * scale[i // 128, j // 128]` ("scale_inv" is the
multiplier that undoes the division by the scale at quantization time). Each block's scale is
amax(|block|) / 448, so the largest element maps to e4m3's max normal value.

Only the 2-D weights of linear layers are quantized; embeddings, lm_head, norms, biases and MoE
routers stay in their training dtype (bf16), as in the HF FP8 checkpoints.
"""
from __future__ import annotations

import math
from typing import Iterable, Iterator, Sequence, Tuple

import torch

from maspo_megatron.rollout.weight_sync.bucketing import HFItem

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
# Substrings of HF names that stay unquantized (matches `modules_to_not_convert` of HF FP8 checkpoints).
DEFAULT_KEEP_PATTERNS = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "shared_expert_gate", "router")


def quantization_config(block: Tuple[int, int] = DEFAULT_BLOCK) -> dict:
    """The `quantization_config` entry of config.json that tells SGLang to expect this layout."""
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(block)}


def should_quantize(hf_name: str, tensor: torch.Tensor, keep_patterns: Sequence[str] = DEFAULT_KEEP_PATTERNS) -> bool:
    """True for the 2-D `.weight` of a linear layer that is not in `keep_patterns`."""
    if tensor.dim() != 2 or not hf_name.endswith(".weight") or not tensor.is_floating_point():
        return False
    return not any(pattern in hf_name for pattern in keep_patterns)


def quantize_blockwise(weight: torch.Tensor, block: Tuple[int, int] = DEFAULT_BLOCK) -> Tuple[torch.Tensor, torch.Tensor]:
    """weight[N, K] (any float dtype) -> (w_fp8[N, K] e4m3, scale_inv[ceil(N/bn), ceil(K/bk)] fp32).

    N and K need not be multiples of the block: edge blocks are padded with zeros (which do not
    change a block's amax) and the padding is cut off again.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 quantization: expected a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    block_rows, block_cols = block
    n_row_blocks, n_col_blocks = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    padded = torch.zeros(n_row_blocks * block_rows, n_col_blocks * block_cols, dtype=torch.float32,
                         device=weight.device)
    padded[:rows, :cols] = weight
    blocks = padded.view(n_row_blocks, block_rows, n_col_blocks, block_cols)
    amax = blocks.abs().amax(dim=(1, 3))
    # An all-zero block gets scale 1 (any scale reproduces zeros); avoids 0/0.
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = blocks / scale_inv[:, None, :, None]
    w_fp8 = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(padded.shape)[:rows, :cols].contiguous()
    return w_fp8, scale_inv.contiguous()


def dequantize_blockwise(w_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         block: Tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """(w_fp8[N, K], scale_inv[ceil(N/bn), ceil(K/bk)]) -> w[N, K] fp32, as the engine computes it."""
    rows, cols = w_fp8.shape
    expanded = scale_inv.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)[:rows, :cols]
    return w_fp8.to(torch.float32) * expanded


def fp8_stream(items: Iterable[HFItem], block: Tuple[int, int] = DEFAULT_BLOCK,
               keep_patterns: Sequence[str] = DEFAULT_KEEP_PATTERNS) -> Iterator[HFItem]:
    """Quantizes linear weights of an HF stream on the fly; a weight and its `weight_scale_inv` share a group."""
    for name, tensor, group_key in items:
        if not should_quantize(name, tensor, keep_patterns):
            yield name, tensor, group_key
            continue
        w_fp8, scale_inv = quantize_blockwise(tensor, block)
        key = group_key if group_key is not None else ("fp8", name)
        yield name, w_fp8, key
        yield name[: -len("weight")] + "weight_scale_inv", scale_inv, key
