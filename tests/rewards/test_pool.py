"""The worker pool: adversarial model output, killed/stuck/hungry workers, order, registry, async."""
import time

import pytest

from maspo_megatron.rewards import RewardError, RewardSample, RewardScorer, score_batch

LIMIT_S = 1.0
GRACE_S = 1.0  # what the issue allows on top of the per-sample limit


def test_adversarial_outputs_finish_within_the_limit_and_the_rest_is_scored():
    adversarial = [
        "\\boxed{10^{10^{10}}}",
        "\\boxed{9^{9^{9^{9}}}}",
        "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
        "\\boxed{" + "{" * 300 + "1" + "}" * 300 + "}",
        "x" * 1_000_000,
        "\\boxed{" + "1+" * 200_000 + "1}",
        b"\xff\xfe\xfd \\boxed{\x80\x81}",
    ]
    normal = [("So \\boxed{12}.", "12", "correct"), ("#### 7", "8", "wrong"), ("\\boxed{\\frac{3}{4}}", "0.75", "correct")]
    responses = [r for r, _, _ in normal] + adversarial + [r for r, _, _ in normal]
    truths = [g for _, g, _ in normal] + ["7"] * len(adversarial) + [g for _, g, _ in normal]
    with RewardScorer(name="math", timeout_s=LIMIT_S, num_workers=2, max_answer_chars=100_000) as scorer:
        started = time.monotonic()
        results = scorer.score(list(zip(responses, truths, strict=True)))
        elapsed_s = time.monotonic() - started
    assert [r.reason for r in results[:3]] == [v for _, _, v in normal]
    assert [r.reason for r in results[-3:]] == [v for _, _, v in normal]
    for response, result in zip(adversarial, results[3:-3], strict=True):
        assert result.reward == 0.0
        assert result.reason.split(":")[0].split(" ")[0] in ("timeout", "unparsable", "wrong"), (response[:40], result)
    # Every sample is bounded by the limit (plus kill grace); two workers share the batch.
    assert elapsed_s < len(responses) * (LIMIT_S + GRACE_S) / 2 + 5


def test_killed_worker_is_replaced_and_the_batch_goes_on():
    with RewardScorer(name="tests.rewards.reward_fixtures:misbehaving", timeout_s=LIMIT_S, num_workers=2, memory_limit_mb=200) as scorer:
        first = scorer.score([("a", None), ("b", None)])
        first_pids = {r.reason for r in first}
        batch = ["a", "exit", "b", "ignore-signals", "c", "hog", "d", "raise", "sleep", "e"]
        started = time.monotonic()
        results = scorer.score([(r, None) for r in batch])
        slowest_s = time.monotonic() - started
        by_response = dict(zip(batch, results, strict=True))
        assert by_response["exit"].reason == "error: worker died (exit code 3)"
        assert by_response["ignore-signals"].reason == "timeout"  # killed from outside (counted below)
        assert by_response["hog"].reason == "error: memory limit exceeded (worker killed)"
        assert by_response["raise"].reason == "error: KeyError: 'boom'"
        assert by_response["sleep"].reason == "timeout"  # in-worker timer, worker kept
        for name in "abcde":
            assert by_response[name].reward == 1.0 and by_response[name].reason.startswith("ok pid")
        assert scorer.workers_replaced == 3  # exit, ignore-signals, hog
        stuck_s = scorer.last_latencies_s[batch.index("ignore-signals")]
        assert LIMIT_S + 0.5 <= stuck_s < LIMIT_S + GRACE_S  # killed at limit + kill grace, not before
        # The replaced workers really are new processes, and they keep scoring.
        after = scorer.score([("f", None), ("g", None), ("h", None)])
        assert all(r.reward == 1.0 for r in after)
        assert not {r.reason for r in after} <= first_pids
    assert slowest_s < 4 * (LIMIT_S + GRACE_S)


def test_results_in_input_order_with_metadata_and_options():
    samples = [RewardSample(f"r{i}", None, {"weight": i, "id": f"s{i}"}) for i in range(20)]
    with RewardScorer(name="tests.rewards.reward_fixtures:uses_metadata", num_workers=2, options={"bonus": 0.5}) as scorer:
        results = scorer.score(samples)
    assert [r.reward for r in results] == [i + 0.5 for i in range(20)]
    assert [r.reason for r in results] == [f"weighted s{i}" for i in range(20)]


def test_score_batch_one_call():
    results = score_batch("math", ["\\boxed{4}", "#### 5", "no idea"], ["4", "4", "4"], timeout_s=2.0, num_workers=1)
    assert [(r.reward, r.reason) for r in results] == [(1.0, "correct"), (0.0, "wrong"), (0.0, "unparsable: no final answer")]
    valued = score_batch("math", ["\\boxed{4}", "no idea"], ["4", "4"], timeout_s=2.0, num_workers=0, correct=2.0, unparsable=-1.0)
    assert [r.reward for r in valued] == [2.0, -1.0]
    with_metadata = score_batch("tests.rewards.reward_fixtures:uses_metadata", ["a", "b"], [None, None], num_workers=1, bonus=1.0,
                                metadata=[{"weight": 2, "id": "p"}, {"weight": 3, "id": "q"}])
    assert [(r.reward, r.reason) for r in with_metadata] == [(3.0, "weighted p"), (4.0, "weighted q")]
    with pytest.raises(ValueError, match="2 responses but 1 ground truths"):
        score_batch("math", ["a", "b"], ["1"])


def test_registered_name_and_import_path():
    import tests.rewards.reward_fixtures  # noqa: F401 - registers "test_length_reward"

    by_name = score_batch("test_length_reward", ["abc", "hello"], [None, None], num_workers=1)
    assert [(r.reward, r.reason) for r in by_name] == [(3.0, "length"), (5.0, "length")]
    by_path = score_batch("tests.rewards.reward_fixtures:exact_match", ["7", "8"], ["7", "7"], num_workers=0)
    assert [r.reward for r in by_path] == [1.0, 0.0]


def test_async_reward_runs_concurrently_with_a_timeout():
    responses = ["a", "b", "hang"] + ["a"] * 17
    started = time.monotonic()
    results = score_batch("tests.rewards.reward_fixtures:remote_verifier", responses, ["a"] * 20, timeout_s=LIMIT_S)
    elapsed_s = time.monotonic() - started
    assert [r.reward for r in results] == [1.0, 0.0, 0.0] + [1.0] * 17
    assert results[2].reason == "timeout"
    assert elapsed_s < LIMIT_S + 0.2 * 20 / 2  # concurrent: far below 20 x 0.2 s in sequence


@pytest.mark.parametrize("name,message", [
    ("no_such_reward", "reward 'no_such_reward': unknown"),
    ("tests.rewards.reward_fixtures:nothing", "has no attribute 'nothing'"),
    ("no_such_module:fn", "cannot import module 'no_such_module'"),
])
def test_unknown_rewards_give_one_line_errors(name, message):
    with pytest.raises(RewardError, match=message):
        RewardScorer(name=name, num_workers=0)


def test_unknown_option_is_named():
    with pytest.raises(RewardError, match="reward.options.bogus"):
        RewardScorer(name="tests.rewards.reward_fixtures:exact_match", num_workers=0, options={"bogus": 1})
    with pytest.raises(RewardError, match="unknown option 'bogus_field'"):
        RewardScorer(name="math", bogus_field=1)


def test_scorer_from_config_and_bad_pattern():
    from maspo_megatron.config import ConfigError, load_config

    cfg = load_config(overrides=["reward.num_workers=0", "reward.correct=3.0", r"reward.answer_pattern='Answer: (\d+)'"])
    with RewardScorer(cfg.reward) as scorer:
        assert [r.reward for r in scorer.score([("Answer: 4", "4"), ("Answer: 5", "4")])] == [3.0, 0.0]
    with pytest.raises(ConfigError, match=r"reward.answer_pattern: invalid regex '\(a'"):
        load_config(overrides=["reward.answer_pattern='(a'"])


def test_a_function_workers_cannot_import_is_refused_by_name():
    from maspo_megatron.rewards import register_reward

    @register_reward("test_local_reward")
    def local_reward(response, ground_truth, metadata):
        return 1.0

    with pytest.raises(RewardError, match="reward '.*local_reward': cannot be sent to a worker process"):
        RewardScorer(name="test_local_reward", num_workers=1)
    # In-process scoring needs no pickling.
    assert [r.reward for r in score_batch("test_local_reward", ["x"], [None], num_workers=0)] == [1.0]


def test_samples_queued_behind_a_killed_worker_are_scored_by_its_replacement():
    # One worker: "a" (and later "c") wait in its pipe behind the sample that gets it killed.
    with RewardScorer(name="tests.rewards.reward_fixtures:misbehaving", timeout_s=LIMIT_S, num_workers=1) as scorer:
        results = scorer.score([("ignore-signals", None), ("a", None), ("exit", None), ("c", None), ("d", None)])
        assert [r.reason.split(" pid")[0] for r in results] == ["timeout", "ok", "error: worker died (exit code 3)", "ok", "ok"]
        assert scorer.workers_replaced == 2


def test_a_worker_found_dead_when_handed_a_sample_is_replaced():
    import os
    import signal

    with RewardScorer(name="tests.rewards.reward_fixtures:misbehaving", timeout_s=LIMIT_S, num_workers=1) as scorer:
        scorer.score([("a", None)])
        worker = scorer._pool._workers[0]
        os.kill(worker.process.pid, signal.SIGKILL)
        worker.process.join(timeout=10)
        # The next send hits a closed pipe before the driver has read the worker's EOF.
        results = scorer.score([("b", None), ("c", None), ("d", None)])
        assert [r.reward for r in results] == [1.0, 1.0, 1.0]
        assert scorer.workers_replaced == 1
