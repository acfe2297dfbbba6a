"""Cases shared by the CPU and GPU tests of the packed-row attention (run_distributed imports them).

`reference_attention` is the independent float64 reference; `packed_vs_alone_case` runs one packed
THD row through the packed spec, the same row through the local spec with the dense block mask,
and every sample alone through the local spec, on this rank's shards of one tiny GPTModel built by
the project's builders.
"""
from __future__ import annotations

import torch

VOCAB = 97
# (prompt, response) lengths; sample_multiple=4 pads some samples inside their segment and
# fixed_row_len adds a padding run at the end of the row.
SAMPLE_SHAPES = ((3, 6), (2, 1), (5, 9), (1, 3), (4, 4))
ROW_TOKENS = 48


def reference_attention(q, k, v, lengths, scale, left):
    """float64 causal attention per segment, written out: q[T, Hq, D], k/v[T, Hkv, D] -> [T, Hq, D].

    left: how many earlier keys a query sees (-1: all of its segment).
    """
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    outputs, start = [], 0
    for length in lengths:
        index = torch.arange(length, device=q.device)
        back = index[:, None] - index[None, :]
        allowed = (back >= 0) & ((back <= left) if left >= 0 else True)
        qs = q[start:start + length].transpose(0, 1)                                        # [Hq, L, D]
        ks = k[start:start + length].transpose(0, 1).repeat_interleave(groups, dim=0)       # [Hq, L, D]
        vs = v[start:start + length].transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = (qs @ ks.transpose(1, 2)) * scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.exp(scores - scores.amax(-1, keepdim=True))
        outputs.append(((probs / probs.sum(-1, keepdim=True)) @ vs).transpose(0, 1))
        start += length
    return torch.cat(outputs)


def samples():
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(11)
    return [TrainSample(torch.randint(1, VOCAB, (p,), generator=gen).tolist(),
                        torch.randint(1, VOCAB, (r,), generator=gen).tolist(), 1.0) for p, r in SAMPLE_SHAPES]


def _backward(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.detach().float().cpu() for name, p in model.named_parameters()}


def _build(parallel, window, device: str, dtype: str):
    from maspo_megatron.config import ModelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider

    model_cfg = ModelConfig(tiny_layers=2, tiny_hidden=64, tiny_heads=4, tiny_kv_heads=2, tiny_ffn=96, dtype=dtype)
    config, meta = build_model_config("tiny", model_cfg, parallel, vocab_size=VOCAB)
    config.window_size = window
    models = []
    for backend in ("packed", "dense"):
        model = gpt_model_provider(config, meta, backend=backend).to(device)
        models.append(model.to(config.params_dtype))
    models[1].load_state_dict(models[0].state_dict())
    return models


def packed_vs_alone_case(tp: int, window, device: str = "cpu", dtype: str = "fp32", cu_device: str = "cpu") -> dict:
    """{"packed"|"dense"|"alone": (logits[T, V/tp] fp32, {param: grad fp32}), "real": BoolTensor[T]}.

    loss = sum over the samples' own tokens of logits * fixed random weights (the same weights in
    the three runs); "alone" sums the per-sample losses.
    """
    from maspo_megatron.config import ParallelConfig
    from maspo_megatron.models.packed_attention import PackedDotProductAttention, thd_packed_seq_params
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.trainer.batch import pack_micro_batches

    parallel = ParallelConfig(tp=tp)
    init_distributed(parallel, seed=3)
    packed_model, dense_model = _build(parallel, window, device, dtype)
    assert isinstance(packed_model.decoder.layers[0].self_attention.core_attention, PackedDotProductAttention)
    assert not isinstance(dense_model.decoder.layers[0].self_attention.core_attention, PackedDotProductAttention)

    sample_list = samples()
    (batches,) = pack_micro_batches(sample_list, row_tokens=ROW_TOKENS, sample_multiple=4, fixed_row_len=True)
    batch = batches[0]
    cu = batch.segment_bounds(0)
    starts = {int(batch.segment_ids[0, cu[i]]): int(cu[i]) for i in range(len(cu) - 1) if batch.segment_ids[0, cu[i]] >= 0}
    real = torch.zeros(ROW_TOKENS, dtype=torch.bool)  # the samples' own tokens: no padding of either kind
    for index, sample in enumerate(sample_list):
        real[starts[index]:starts[index] + len(sample)] = True
    vocab_shard = packed_model.output_layer.weight.shape[0]
    weights = torch.randn(ROW_TOKENS, vocab_shard, generator=torch.Generator().manual_seed(5 + tp_rank(tp)))
    weights, on_device = weights.to(device), real.to(device)
    tokens, positions = batch.tokens.to(device), batch.position_ids.to(device)

    params = thd_packed_seq_params(cu.to(cu_device))
    logits = packed_model(tokens, positions, None, packed_seq_params=params)[0].float()
    packed = (logits.detach().cpu(), _backward(packed_model, (logits[on_device] * weights[on_device]).sum()))
    logits = dense_model(tokens, positions, batch.attention_mask().to(device))[0].float()
    dense = (logits.detach().cpu(), _backward(dense_model, (logits[on_device] * weights[on_device]).sum()))
    # the packed spec without packed_seq_params: SDPA with the same dense block mask (eval-style calls)
    logits = packed_model(tokens, positions, batch.attention_mask().to(device))[0].float()
    packed_mask = (logits.detach().cpu(), _backward(packed_model, (logits[on_device] * weights[on_device]).sum()))

    alone_logits = torch.zeros_like(dense[0])
    alone_loss = 0.0
    for index, sample in enumerate(sample_list):
        ids = torch.tensor([*sample.prompt_ids, *sample.response_ids], device=device)[None]
        length, start = ids.shape[1], starts[index]
        causal = ~torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
        # with a window the local spec builds its own sliding causal mask (and ignores a given one)
        out = dense_model(ids, torch.arange(length, device=device)[None], None if window else causal)[0].float()
        alone_logits[start:start + length] = out.detach().cpu()
        alone_loss = alone_loss + (out * weights[start:start + length]).sum()
    alone = (alone_logits, _backward(dense_model, alone_loss))
    return {"packed": packed, "packed_mask": packed_mask, "dense": dense, "alone": alone, "real": real}


def tp_rank(tp: int) -> int:
    return torch.distributed.get_rank() % tp if torch.distributed.is_initialized() else 0


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12))


def assert_packed_matches(results: list, window, tolerance: float) -> None:
    """Packed THD row and packed spec with the dense mask == each sample alone (logits and grads);
    packed THD row == local spec with the dense mask when there is no window."""
    for result in results:
        tokens = result["real"]
        pairs = [("packed", "alone"), ("packed_mask", "alone")]
        if not window:  # the local spec replaces a given mask by its window mask (fused_softmax.py)
            pairs.append(("packed", "dense"))
        for ours, reference in pairs:
            (logits, grads), (ref_logits, ref_grads) = result[ours], result[reference]
            assert relative(logits[tokens], ref_logits[tokens]) < tolerance, (ours, reference)
            assert grads.keys() == ref_grads.keys()
            for name, grad in grads.items():
                assert relative(grad, ref_grads[name]) < tolerance, (ours, reference, name, relative(grad, ref_grads[name]))
