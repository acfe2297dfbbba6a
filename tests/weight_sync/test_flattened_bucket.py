"""Flattened-bucket wire format: round trip with mixed dtypes, alignment, SGLang's unpickling allowlist."""
import base64
import io
import pickle

import pytest
import torch

from maspo_megatron.rollout.weight_sync.flattened_bucket import (
    FlattenedTensorMetadata,
    flatten_tensors,
    load_payload,
    reconstruct_tensors,
    serialize_payload,
)


def _mixed_tensors():
    gen = torch.Generator().manual_seed(0)
    return [
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(3, 5, generator=gen).to(torch.bfloat16)),
        ("model.norm.weight", torch.randn(7, generator=gen)),  # 28 bytes: the next start must be re-aligned
        ("step", torch.arange(3, dtype=torch.int64)),
        ("model.layers.0.mlp.down_proj.weight", torch.randn(3, 3, generator=gen).to(torch.float8_e4m3fn)),
        ("model.layers.0.mlp.down_proj.weight_scale_inv", torch.rand(1, 1, generator=gen)),
        ("transposed", torch.randn(5, 6, generator=gen).t()),  # non-contiguous input
        ("half", torch.randn(2, 3, generator=gen).half()),
    ]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t


def _assert_same(expected, got):
    assert [n for n, _ in expected] == [n for n, _ in got]
    for (name, want), (_, have) in zip(expected, got, strict=True):
        assert have.dtype == want.dtype, name
        assert have.shape == want.shape, name
        assert torch.equal(_bits(have), _bits(want)), name


def test_metadata_counts_bytes_and_aligns_starts():
    tensors = _mixed_tensors()
    buf, metadata = flatten_tensors(tensors)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    for meta, (name, t) in zip(metadata, tensors, strict=True):
        assert meta.name == name
        assert meta.numel == t.numel() * t.element_size() == meta.end_idx - meta.start_idx
        assert meta.start_idx % t.element_size() == 0
    starts = [m.start_idx for m in metadata]
    assert starts == sorted(starts) and all(a.end_idx <= b.start_idx for a, b in zip(metadata[:-1], metadata[1:], strict=True))


def test_round_trip_in_memory_and_fresh_buffer():
    tensors = _mixed_tensors()
    buf, metadata = flatten_tensors(tensors)
    _assert_same(tensors, reconstruct_tensors(buf, metadata))
    tensors[0][1].zero_()  # the bucket must own its bytes
    assert not torch.equal(reconstruct_tensors(buf, metadata)[0][1], tensors[0][1])


def test_payload_round_trip_through_sglang_allowlist():
    tensors = _mixed_tensors()
    payload = serialize_payload(*flatten_tensors(tensors))
    assert isinstance(payload, str)
    data = base64.b64decode(payload)
    assert b"sglang.srt.weight_sync.tensor_bucket" in data and b"maspo_megatron" not in data
    _assert_same(tensors, load_payload(payload))


def test_own_metadata_class_would_be_rejected_by_sglang():
    # What a naive sender produces: our class pickled by reference. SGLang's allowlist refuses it.
    buf, metadata = flatten_tensors(_mixed_tensors()[:1])
    stream = io.BytesIO()
    pickle.Pickler(stream).dump({"flattened_tensor": buf, "metadata": metadata})
    with pytest.raises(pickle.UnpicklingError, match="maspo_megatron"):
        load_payload(base64.b64encode(stream.getvalue()).decode())


def test_bad_inputs_give_one_line_errors():
    with pytest.raises(ValueError, match="empty bucket"):
        flatten_tensors([])
    with pytest.raises(ValueError, match="base64"):
        load_payload("not base64 !!")
    buf = torch.zeros(8, dtype=torch.uint8)
    bad = [FlattenedTensorMetadata("w", torch.Size([4]), torch.float32, 0, 16, 16)]
    with pytest.raises(ValueError, match="'w'"):
        reconstruct_tensors(buf, bad)


def test_release_drops_each_tensor_once_copied():
    tensors = _mixed_tensors()
    expected = [(n, t.clone()) for n, t in tensors]
    bucket = list(tensors)
    buf, metadata = flatten_tensors(bucket, release=True)
    assert all(t is None for _, t in bucket) and [n for n, _ in bucket] == [n for n, _ in expected]
    _assert_same(expected, reconstruct_tensors(buf, metadata))
