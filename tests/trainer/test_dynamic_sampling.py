"""DAPO dynamic sampling against a scripted `generate_and_score`."""
import pytest

from maspo_megatron.data import PromptSampler
from maspo_megatron.trainer.dynamic_sampling import collect_groups

GROUP = 4
# Prompt i's group of rewards: every third prompt is informative (mixed rewards).
def rewards_for(prompt):
    return [1.0, 0.0, 1.0, 0.0] if prompt % 3 == 0 else ([1.0] * GROUP if prompt % 3 == 1 else [0.0] * GROUP)


class Engine:
    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [{"prompt": p, "rewards": rewards_for(p)} for p in prompts]


def counter():
    state = {"next": 0}

    def next_prompts(k):
        start = state["next"]
        state["next"] += k
        return list(range(start, start + k))

    return next_prompts


def test_drops_uniform_groups_and_refills():
    engine = Engine()
    groups, stats = collect_groups(counter(), engine, num_groups=4, group_size=GROUP, max_extra_rounds=5)
    assert [g["prompt"] for g in groups] == [0, 3, 6, 9]
    assert all(g["prompt"] % 3 == 0 for g in groups)
    # Round 1: prompts 0-3 (keeps 0, 3). Keep rate 1/2 -> round 2 asks 2 / 0.5 = 4: prompts 4-7 (keeps 6).
    # Keep rate 3/8 -> round 3 asks ceil(1 / 0.375) = 3: prompts 8-10 (keeps 9).
    assert [len(c) for c in engine.calls] == [4, 4, 3]
    assert (stats.rounds, stats.prompts_generated, stats.groups_dropped, stats.groups_kept, stats.short) == (3, 11, 7, 4, False)


def test_gives_up_after_max_extra_rounds():
    all_same = lambda prompts: [{"rewards": [1.0] * GROUP} for _ in prompts]  # noqa: E731
    groups, stats = collect_groups(counter(), all_same, num_groups=3, group_size=GROUP, max_extra_rounds=2)
    assert groups == [] and stats.short and stats.rounds == 3 and stats.groups_dropped == stats.prompts_generated
    padded, stats = collect_groups(counter(), all_same, num_groups=3, group_size=GROUP, max_extra_rounds=0, pad_with_dropped=True)
    assert len(padded) == 3 and stats.groups_padded == 3 and stats.rounds == 1


def test_surplus_and_oversampling():
    engine = Engine()
    groups, stats = collect_groups(counter(), engine, num_groups=2, group_size=GROUP, oversample_factor=3.0)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 6  # 0..5: informative 0 and 3
    assert [g["prompt"] for g in groups] == [0, 3] and stats.groups_surplus == 0
    groups, stats = collect_groups(counter(), Engine(), num_groups=1, group_size=GROUP, oversample_factor=4.0)
    assert [g["prompt"] for g in groups] == [0] and stats.groups_surplus == 1


def test_disabled_is_one_round_without_filtering():
    groups, stats = collect_groups(counter(), Engine(), num_groups=5, group_size=GROUP, enabled=False, oversample_factor=3.0)
    assert [g["prompt"] for g in groups] == [0, 1, 2, 3, 4] and stats.rounds == 1 and stats.groups_dropped == 0


def test_works_with_the_sampler_and_objects():
    class Group:
        def __init__(self, rewards):
            self.rewards = rewards

    sampler = PromptSampler(30, seed=0)
    groups, stats = collect_groups(lambda k: sampler.next_indices(k), lambda ps: [Group(rewards_for(p)) for p in ps],
                                   num_groups=5, group_size=GROUP, max_extra_rounds=10)
    assert len(groups) == 5 and stats.prompts_generated == sampler.served
    assert "dynamic_sampling/groups_dropped" in stats.as_metrics()


def test_bad_engine_output_is_named():
    with pytest.raises(ValueError, match="returned 1 groups for 2 prompts"):
        collect_groups(counter(), lambda ps: [{"rewards": [0.0] * GROUP}], num_groups=2, group_size=GROUP)
    with pytest.raises(ValueError, match="a group has 3 rewards, expected group_size=4"):
        collect_groups(counter(), lambda ps: [{"rewards": [0.0] * 3} for _ in ps], num_groups=2, group_size=GROUP)
