"""The export fast path: shards scattered straight into HF tensors equal the models package's
gather + split bit-exactly; bucket buffers alternate, are reused, and oversize groups get their own."""
import pytest
import torch

from maspo_megatron.models import WeightMap, layouts
from maspo_megatron.rollout.weight_sync.bucket_writer import BucketBuffers, scatter_shards

NAMES = ["embedding.word_embeddings.weight", "output_layer.weight", "decoder.layers.0.self_attention.linear_qkv.weight",
         "decoder.layers.0.self_attention.linear_qkv.bias", "decoder.layers.1.self_attention.linear_proj.weight",
         "decoder.layers.0.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc2.weight",
         "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.final_layernorm.weight"]


def _wmap(tp: int) -> WeightMap:
    import transformers

    config = transformers.Qwen2Config(vocab_size=100, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=False)
    return WeightMap.from_hf_config(config, tp=tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scatter_equals_gather_then_split(tp, dtype):
    wmap = _wmap(tp)
    generator = torch.Generator().manual_seed(tp)
    for name in NAMES:
        rule, _ = wmap.resolve(name)
        dim, glu = wmap.tp_split(name)
        full = torch.randn(wmap.full_shape(rule), generator=generator).to(dtype)
        shards = [layouts.shard_tp(full, dim, glu, tp, rank) for rank in range(tp)] if dim is not None else [full]
        expected = wmap.megatron_to_hf(name, layouts.gather_tp(shards, dim, glu))
        dests = [torch.full(shape, float("nan"), dtype=dtype) for shape in wmap.hf_shapes(rule)]
        scatter_shards(rule.layout, shards, dim, dests, wmap.meta.num_heads, wmap.meta.num_kv_heads)
        assert len(dests) == len(expected), name
        for dest, (hf_name, want) in zip(dests, expected, strict=True):
            assert dest.shape == want.shape and torch.equal(dest, want), f"tp={tp} {name} -> {hf_name}"


def test_padded_vocab_rows_are_dropped():
    wmap = _wmap(2)
    assert wmap.meta.padded_vocab_size > wmap.meta.vocab_size
    rule, _ = wmap.resolve("embedding.word_embeddings.weight")
    full = torch.arange(wmap.meta.padded_vocab_size, dtype=torch.float32)[:, None].expand(wmap.full_shape(rule))
    shards = [layouts.shard_tp(full.contiguous(), 0, False, 2, r) for r in range(2)]
    dest = torch.empty(wmap.hf_shapes(rule)[0])
    scatter_shards("vocab", shards, 0, [dest], 8, 4)
    assert torch.equal(dest[:, 0], torch.arange(wmap.meta.vocab_size, dtype=torch.float32))


def test_unknown_layout_and_split_dim_are_refused():
    with pytest.raises(ValueError, match="unknown layout"):
        scatter_shards("rotated", [torch.zeros(2)], None, [torch.zeros(2)], 1, 1)
    with pytest.raises(ValueError, match="dim 1"):
        scatter_shards("gate_up", [torch.zeros(4, 2)] * 2, 1, [torch.zeros(4, 2)] * 2, 1, 1)


def test_one_buffer_by_default_reused_for_every_bucket():
    buffers = BucketBuffers(64)
    first, second = buffers.next_buffer(64), buffers.next_buffer(10)
    assert second.data_ptr() == first.data_ptr() and torch.count_nonzero(first) == 0
    with pytest.raises(ValueError, match="count"):
        BucketBuffers(64, count=3)


def test_two_buffers_alternate_are_reused_and_pre_touched():
    buffers = BucketBuffers(64, count=2)
    first, second, third = (buffers.next_buffer(64) for _ in range(3))
    assert first.data_ptr() != second.data_ptr()  # the consumer may hold one bucket while the next fills
    assert third.data_ptr() == first.data_ptr()  # reused, not reallocated
    assert torch.count_nonzero(first) == 0 and first.numel() == 64
    buffers.release()
    assert buffers.next_buffer(10).data_ptr() == first.data_ptr()  # kept across syncs on CPU


def test_oversize_bucket_gets_a_one_off_buffer_and_gpu_style_release_drops_buffers():
    buffers = BucketBuffers(64, keep=False, count=2)
    regular = buffers.next_buffer(64)
    big = buffers.next_buffer(200)
    assert big.numel() == 200 and big.data_ptr() != regular.data_ptr()
    buffers.release()
    assert all(held is None for held in buffers._buffers)  # GPUs: memory goes back to training between syncs
    with pytest.raises(ValueError, match="bucket_bytes"):
        BucketBuffers(0)
