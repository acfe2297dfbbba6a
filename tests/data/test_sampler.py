"""The prompt sampler: deterministic by seed, a new permutation per epoch, exact mid-epoch resume."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maspo_megatron.data import PromptSampler


def test_each_epoch_is_a_permutation_and_epochs_differ():
    sampler = PromptSampler(50, seed=3)
    epochs = [sampler.next_indices(50) for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(50))
    assert epochs[0] != epochs[1] != epochs[2]
    assert sampler.epoch == 2 and sampler.served == 150


def test_deterministic_by_seed():
    assert PromptSampler(40, seed=1).next_indices(100) == PromptSampler(40, seed=1).next_indices(100)
    assert PromptSampler(40, seed=1).next_indices(40) != PromptSampler(40, seed=2).next_indices(40)
    assert PromptSampler(5, shuffle=False).next_indices(12) == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]


def test_batches_cross_epoch_boundaries_without_gaps():
    sampler = PromptSampler(7, seed=0)
    served = sampler.next_indices(5) + sampler.next_indices(5)
    assert sorted(served[:7]) == list(range(7))  # the first epoch complete before the second starts
    assert (sampler.epoch, sampler.position) == (1, 3)


@settings(max_examples=40, deadline=None)
@given(num_items=st.integers(1, 30), seed=st.integers(0, 5), batches=st.lists(st.integers(0, 25), min_size=1, max_size=6),
       then=st.integers(1, 60))
def test_resume_serves_exactly_what_an_uninterrupted_run_would(num_items, seed, batches, then):
    reference = PromptSampler(num_items, seed=seed)
    interrupted = PromptSampler(num_items, seed=seed)
    for count in batches:
        assert interrupted.next_indices(count) == reference.next_indices(count)
    state = interrupted.state_dict()
    resumed = PromptSampler(num_items, seed=seed)
    resumed.load_state_dict(state)
    assert resumed.next_indices(then) == reference.next_indices(then)


def test_resume_mid_epoch_gives_the_unserved_prompts():
    sampler = PromptSampler(10, seed=4)
    first = sampler.next_indices(6)
    resumed = PromptSampler(10, seed=4)
    resumed.load_state_dict(sampler.state_dict())
    rest = resumed.next_indices(4)
    assert sorted(first + rest) == list(range(10))


def test_bad_state_is_named():
    sampler = PromptSampler(10, seed=0)
    with pytest.raises(ValueError, match="num_items=12 in the checkpoint but 10 now"):
        sampler.load_state_dict({**sampler.state_dict(), "num_items": 12})
    with pytest.raises(ValueError, match="missing key 'position'"):
        sampler.load_state_dict({"num_items": 10, "seed": 0, "shuffle": True, "epoch": 0})
    with pytest.raises(ValueError, match="out of range"):
        sampler.load_state_dict({**sampler.state_dict(), "position": 11})


def test_next_items():
    sampler = PromptSampler(3, shuffle=False)
    assert sampler.next_items(["a", "b", "c"], 4) == ["a", "b", "c", "a"]
    with pytest.raises(ValueError, match="dataset has 2 items"):
        sampler.next_items(["a", "b"], 1)
