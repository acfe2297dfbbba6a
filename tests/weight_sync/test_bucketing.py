"""Bucket packing: size limit, oversize tensors, groups never split, generator keeps <= 2 buckets alive."""
import weakref

import pytest
import torch

from maspo_megatron.rollout.weight_sync.bucketing import iter_buckets


def _t(nbytes: int) -> torch.Tensor:
    return torch.zeros(nbytes // 4, dtype=torch.float32)


def _names(buckets):
    return [[n for n, _ in b] for b in buckets]


def test_fills_up_to_limit_and_keeps_order():
    items = [(f"w{i}", _t(40), None) for i in range(7)]
    buckets = list(iter_buckets(items, bucket_bytes=100))
    assert _names(buckets) == [["w0", "w1"], ["w2", "w3"], ["w4", "w5"], ["w6"]]
    assert all(sum(t.numel() * 4 for _, t in b) <= 100 for b in buckets)


def test_exact_fit_closes_bucket():
    buckets = list(iter_buckets([("a", _t(48), None), ("b", _t(52), None), ("c", _t(4), None)], 100))
    assert _names(buckets) == [["a", "b"], ["c"]]


def test_tensor_larger_than_bucket_gets_its_own():
    items = [("small0", _t(20), None), ("huge", _t(400), None), ("small1", _t(20), None)]
    assert _names(iter_buckets(items, 100)) == [["small0"], ["huge"], ["small1"]]


def test_group_at_boundary_moves_whole_to_next_bucket():
    items = [("a", _t(60), None), ("q", _t(20), "qkv"), ("k", _t(20), "qkv"), ("v", _t(20), "qkv"), ("b", _t(8), None)]
    # q alone would still fit beside "a" (80 <= 100) but q+k+v (60) does not: the whole group moves.
    assert _names(iter_buckets(items, 100)) == [["a"], ["q", "k", "v", "b"]]


def test_group_larger_than_bucket_is_one_bucket():
    items = [("gate", _t(80), "fc1"), ("up", _t(80), "fc1"), ("down", _t(80), None)]
    assert _names(iter_buckets(items, 100)) == [["gate", "up"], ["down"]]


def test_adjacent_groups_with_different_keys_are_separate_groups():
    items = [("g0", _t(40), "l0"), ("u0", _t(40), "l0"), ("g1", _t(40), "l1"), ("u1", _t(40), "l1")]
    assert _names(iter_buckets(items, 100)) == [["g0", "u0"], ["g1", "u1"]]


def test_non_contiguous_group_and_duplicates_are_errors():
    with pytest.raises(ValueError, match="not contiguous"):
        list(iter_buckets([("q", _t(4), "g"), ("x", _t(4), None), ("k", _t(4), "g")], 100))
    with pytest.raises(ValueError, match="'a' was produced twice"):
        list(iter_buckets([("a", _t(4), None), ("a", _t(4), None)], 100))
    with pytest.raises(ValueError, match="bucket_bytes"):
        list(iter_buckets([], 0))


def test_at_most_two_buckets_alive():
    alive = weakref.WeakSet()
    max_alive_bytes = 0

    def make(i):
        nonlocal max_alive_bytes
        t = _t(40)
        alive.add(t)  # plain refcounting frees tensors at once (no cycles), so no gc.collect needed
        max_alive_bytes = max(max_alive_bytes, 40 * len(alive))
        return t

    def stream():
        for i in range(40):
            yield f"w{i}", make(i), ("pair", i // 2) if i >= 20 else None

    held = 0
    for bucket in iter_buckets(stream(), bucket_bytes=100):
        held += len(bucket)
        del bucket  # the consumer contract: drop the bucket before asking for the next one
    assert held == 40
    assert 100 < max_alive_bytes <= 2 * 100
