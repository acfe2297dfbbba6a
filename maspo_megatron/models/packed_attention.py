"""Core attention for packed rows without Transformer Engine: causal per sample, O(S) memory.

A drop-in for the local spec's `DotProductAttention` (Megatron-Core 0.16.1 builds it with
`(config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
softmax_scale=None, cp_comm_type=None, pg_collection=None)` and calls
`forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
packed_seq_params=None)`, transformer/attention.py).

THD (`packed_seq_params.qkv_format == "thd"`, one packed row, `attention_mask=None`): Megatron's
`SelfAttention` squeezes the batch dim, applies RoPE per sample from `cu_seqlens_q(_padded)`
(rope_utils._apply_rotary_pos_emb_thd: positions restart at every boundary) and hands us
q[T, Hq, D], k/v[T, Hkv, D]; we return [T, Hq*D]. Each segment of `cu_seqlens` attends causally
to itself only. The `_padded` boundaries win when present: tokens are laid out by them, and a
sample's own padding sits after it, invisible to it under the causal mask.

Kernels (`choose_kernel`), all O(S) memory:
- "varlen": `torch.nn.attention.varlen.varlen_attn` (flash attention, CUDA, bf16/fp16). Its
  signature differs between torch releases (2.9/2.10: `is_causal`; 2.11: `window_size`, no
  `enable_gqa`; 2.13: `enable_gqa`): `varlen_arguments` adapts the call to `inspect.signature`.
- "flex": FlexAttention with a document mask (compiled on first use; CUDA, when varlen is absent).
- "sdpa": `scaled_dot_product_attention` once per segment (CPU, fp32 on CUDA, sliding windows the
  varlen build cannot express). Causal inside each segment, so no [S, S] mask ever exists.

Not packed (`packed_seq_params=None`): q/k/v [S, B, H, D] -> [S, B, Hq*D]; causal SDPA, or SDPA
with the given dense boolean mask ([B|1, 1, S, S], True = masked out, Megatron's convention).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention

KERNELS = ("varlen", "flex", "sdpa")
Window = Optional[tuple[int, int]]


@functools.lru_cache(maxsize=1)
def _varlen_attn():
    """torch's varlen (flash) attention function, or None on builds without it (torch < 2.9)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.lru_cache(maxsize=1)
def _varlen_params() -> frozenset:
    function = _varlen_attn()
    return frozenset() if function is None else frozenset(inspect.signature(function).parameters)


def _flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def available_kernels() -> tuple[str, ...]:
    """The KERNELS this torch build has, in order of preference (which one runs: `choose_kernel`)."""
    found = (("varlen", bool(_varlen_params())), ("flex", _flex_available()), ("sdpa", True))
    return tuple(kernel for kernel, present in found if present)


def _varlen_can_run(window: Window) -> bool:
    params = _varlen_params()
    if not params:
        return False
    return "window_size" in params or ((window is None or window[0] < 0) and "is_causal" in params)


def choose_kernel(device: torch.device, dtype: torch.dtype, window: Window = None) -> str:
    """The fastest kernel that runs here: "varlen" | "flex" | "sdpa" (see the module docstring)."""
    if device.type != "cuda":
        return "sdpa"  # CPU: varlen has no kernel, FlexAttention no backward
    if dtype in (torch.bfloat16, torch.float16):
        if _varlen_can_run(window):
            return "varlen"
        if _flex_available():
            return "flex"
    return "sdpa"


def _check_window(window: Window) -> None:
    if window is not None and (window[1] != 0 or window[0] < -1):
        raise ValueError(f"window_size: {tuple(window)} is not a causal window (left >= -1, right == 0)")


def _per_step(fn):
    """Caches `fn(tensor, *args)` for the last tensor object seen: every layer of a forward gets the
    same cu_seqlens object, so a CUDA->host read (`.tolist()`) or a host->device copy happens once
    per micro-batch instead of once per layer. The cache holds the tensor, so its id cannot be reused."""
    last = {}

    @functools.wraps(fn)
    def cached(tensor: torch.Tensor, *args):
        if last.get("tensor") is not tensor or last.get("args") != args:
            last.update(tensor=tensor, args=args, value=fn(tensor, *args))
        return last["value"]
    return cached


@_per_step
def _segment_lengths(cu_seqlens: torch.Tensor) -> list[int]:
    """Python ints: the segment lengths of one THD boundary tensor."""
    return (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()


@_per_step
def _on_device(cu_seqlens: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int32 boundaries on the kernel's device."""
    return cu_seqlens.to(device=device, dtype=torch.int32, non_blocking=True)


def _repeat_kv(key: torch.Tensor, value: torch.Tensor, heads: int, head_dim: int = 1):
    """k/v with each KV head repeated for its group of query heads (Megatron's and SDPA's order)."""
    groups = heads // key.shape[head_dim]
    if groups == 1:
        return key, value
    return key.repeat_interleave(groups, dim=head_dim), value.repeat_interleave(groups, dim=head_dim)


def varlen_arguments(params: frozenset, query, key, value, scale: float, window: Window):
    """(query, key, value, kwargs) for a varlen_attn whose signature has `params`: causal via
    `window_size` (2.11+) or `is_causal` (2.9/2.10); `scale` folded into q where there is no such
    argument (the kernel's default is 1/sqrt(D)); k/v repeated per query head without `enable_gqa`."""
    kwargs = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0) if window is None else tuple(window)
    elif window is None or window[0] < 0:
        kwargs["is_causal"] = True
    else:
        raise ValueError(f"window_size: {tuple(window)} needs a varlen_attn with window_size (torch >= 2.11)")
    if "scale" in params:
        kwargs["scale"] = scale
    else:
        query = query * (scale * math.sqrt(query.shape[-1]))
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = query.shape[1] != key.shape[1]
    else:
        key, value = _repeat_kv(key, value, query.shape[1])
    # the flash kernel wants dense rows; v (and k without RoPE) are strided views of Megatron's fused QKV
    return query.contiguous(), key.contiguous(), value.contiguous(), kwargs


def _varlen(query, key, value, cu_seqlens, max_seqlen: int, scale: float, window: Window):
    query, key, value, kwargs = varlen_arguments(_varlen_params(), query, key, value, scale, window)
    cu = _on_device(cu_seqlens, query.device)
    return _varlen_attn()(query, key, value, cu, cu, max_seqlen, max_seqlen, **kwargs)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)  # automatic dynamic shapes: one recompile, not one per row length


def _flex(query, key, value, cu_seqlens, scale: float, window: Window):
    from torch.nn.attention.flex_attention import create_block_mask

    total = query.shape[0]
    cu = _on_device(cu_seqlens, query.device)
    positions = torch.arange(total, device=query.device, dtype=torch.int32)
    document = torch.searchsorted(cu[1:], positions, right=True)
    left = -1 if window is None else window[0]

    def mask_mod(batch, head, q_index, kv_index):
        allowed = (document[q_index] == document[kv_index]) & (q_index >= kv_index)
        if left >= 0:
            allowed = allowed & (q_index - kv_index <= left)
        return allowed

    # _compile: the mask is built block by block, never as a [T, T] tensor
    block_mask = create_block_mask(mask_mod, None, None, total, total, device=query.device, _compile=True)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (query, key, value))  # [1, H, T, D]
    out = _compiled_flex()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.squeeze(0).transpose(0, 1)


def _window_mask(length: int, window: Window, device) -> Optional[torch.Tensor]:
    """BoolTensor[L, L], True = attend: causal, and at most `left` tokens back; None without a window."""
    if window is None or window[0] < 0:
        return None
    index = torch.arange(length, device=device)
    back = index[:, None] - index[None, :]
    return (back >= 0) & (back <= window[0])


def _sdpa(query, key, value, scale: float, window: Window, mask: Optional[torch.Tensor] = None):
    """q[B, Hq, L, D], k/v[B, Hkv, L, D] -> [B, Hq, L, D]; causal unless a dense `mask` (True = attend)."""
    key, value = _repeat_kv(key, value, query.shape[1])
    if mask is None:
        mask = _window_mask(query.shape[2], window, query.device)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=mask is None, scale=scale)


def _sdpa_segments(query, key, value, cu_seqlens, scale: float, window: Window):
    outputs = []
    for q, k, v in zip(*(t.split(_segment_lengths(cu_seqlens)) for t in (query, key, value)), strict=True):
        segment = _sdpa(*(t.transpose(0, 1).unsqueeze(0) for t in (q, k, v)), scale, window)  # [1, Hq, L, D]
        outputs.append(segment.squeeze(0).transpose(0, 1))
    return torch.cat(outputs, dim=0)


def packed_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, *, scale: Optional[float] = None, window: Window = None,
                            kernel: Optional[str] = None) -> torch.Tensor:
    """Causal attention inside each segment of a packed row.

    query[T, Hq, D], key/value[T, Hkv, D] (Hkv divides Hq: grouped-query attention), cu_seqlens[k+1]
    (int, boundaries, cu_seqlens[-1] == T, any device), max_seqlen: the longest segment.
    window: Megatron's (left, 0): a query sees itself and at most `left` earlier keys (-1: all).
    kernel: one of KERNELS, default `choose_kernel`. Returns [T, Hq, D] in query's dtype.
    """
    if query.shape[0] != key.shape[0] or query.shape[1] % key.shape[1]:
        raise ValueError(f"packed_causal_attention: query {tuple(query.shape)} and key {tuple(key.shape)} "
                         "need the same token count and Hkv dividing Hq")
    _check_window(window)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    kernel = kernel or choose_kernel(query.device, query.dtype, window)
    if kernel == "varlen":
        return _varlen(query, key, value, cu_seqlens, int(max_seqlen), scale, window)
    if kernel == "flex":
        return _flex(query, key, value, cu_seqlens, scale, window)
    if kernel == "sdpa":
        return _sdpa_segments(query, key, value, cu_seqlens, scale, window)
    raise ValueError(f"packed_causal_attention: kernel {kernel!r} is not one of {list(KERNELS)}")


def thd_packed_seq_params(cu_seqlens: torch.Tensor, max_seqlen: Optional[int] = None) -> PackedSeqParams:
    """Megatron's THD parameters for ONE packed row whose segments are `cu_seqlens` (int32 [k+1]).

    The same tensor serves as the plain and the padded boundaries (a sample's padding belongs to its
    segment). max_seqlen is the longest segment, not the row length: with max_seqlen == T,
    rope_utils._apply_rotary_pos_emb_thd switches to offset mode (row positions instead of
    positions restarting per sample; the same attention, RoPE being relative, but other rounding
    than the rollout engine's). Keep `cu_seqlens` where the attention runs (TE wants it on the
    GPU; the packed spec takes either, and a CPU tensor spares a sync in Megatron's per-layer
    `.tolist()` in RoPE). max_seqlen: the longest segment when the caller knows it (no device sync).
    """
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if max_seqlen is None else int(max_seqlen)
    cu = cu_seqlens.to(torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu,
                           cu_seqlens_kv_padded=cu, max_seqlen_q=longest, max_seqlen_kv=longest)


class PackedDotProductAttention(MegatronModule):
    """Core attention for the local spec that understands THD packed rows (module docstring).

    Refuses (ValueError, one line) what it does not implement: context parallel (`parallel.cp`),
    attention dropout, non-causal mask types, non-vanilla softmax, attention bias.
    """

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        if config.context_parallel_size > 1:
            raise ValueError(f"parallel.cp: {config.context_parallel_size} needs Transformer Engine's attention; "
                             "the packed (torch) attention runs cp == 1 only")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(f"attention_dropout: {dropout} is not supported by the packed attention (use 0)")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"attn_mask_type: {attn_mask_type} is not causal; the packed attention is causal only")
        if config.softmax_type != "vanilla":
            raise ValueError(f"softmax_type: {config.softmax_type!r} is not supported by the packed attention")
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = config.kv_channels
        # Megatron's apply_query_key_layer_scaling divides the scale by layer_number and the softmax
        # multiplies it back: the product is the plain 1/sqrt(D) (or the given softmax_scale).
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.window = (tuple(config.window_size) if is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number) else None)
        _check_window(self.window)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: Optional[torch.Tensor], attn_mask_type: Optional[AttnMaskType] = None,
                attention_bias: Optional[torch.Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
        """THD: q[T, Hq, D], k/v[T, Hkv, D] -> [T, Hq*D]. Otherwise [S, B, H, D] -> [S, B, Hq*D]."""
        if attention_bias is not None:
            raise ValueError("attention_bias: not supported by the packed attention")
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            if attention_mask is not None:
                raise ValueError("attention_mask: THD packed rows take attention_mask=None (cu_seqlens say it)")
            padded = packed_seq_params.cu_seqlens_q_padded
            cu = packed_seq_params.cu_seqlens_q if padded is None else padded
            # max_seqlen_q may describe the unpadded lengths; the kernel runs on the padded segments
            max_seqlen = packed_seq_params.max_seqlen_q if padded is None else max(_segment_lengths(cu))
            out = packed_causal_attention(query, key, value, cu, max_seqlen, scale=self.softmax_scale,
                                          window=self.window)
            return out.reshape(out.shape[0], -1)
        if packed_seq_params is not None:
            raise ValueError(f"packed_seq_params.qkv_format: {packed_seq_params.qkv_format!r}; only 'thd' is packed")
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [B, H, S, D]
        allowed = None if attention_mask is None else ~attention_mask
        out = _sdpa(q, k, v, self.softmax_scale, self.window, mask=_and_window(allowed, self.window))
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def _and_window(allowed: Optional[torch.Tensor], window: Window) -> Optional[torch.Tensor]:
    """A dense allow-mask narrowed to the sliding window (None stays None: causal + window in _sdpa)."""
    if allowed is None:
        return None
    band = _window_mask(allowed.shape[-1], window, allowed.device)
    return allowed if band is None else allowed & band
