"""The SGLang engine/client against the stand-in server: batches, retries, aborts, control plane."""
import threading
import time

import pytest
import requests
import torch

from maspo_megatron.rollout import RolloutError, SamplingParams
from tests.rollout.conftest import PROMPTS, engine_for, generate_then_abort, tiny_model
from tests.rollout.test_local_engine import teacher_forced_logprobs


def test_batch_with_n_samples_matches_model(standin):
    server = standin()
    engine = engine_for(server.url)
    try:
        groups = engine.generate(PROMPTS, 3, SamplingParams(temperature=0.8, max_new_tokens=10, seed=4))
        assert [len(g) for g in groups] == [3, 3, 3]
        model = tiny_model(0)  # the weights the stand-in serves (tiny_model_dir)
        for prompt, group in zip(PROMPTS, groups, strict=True):
            for sample in group:
                assert sample.finish_reason in ("stop", "length") and 1 <= len(sample.token_ids) <= 10
                assert sample.weight_version == 0  # server reports "default": the engine's version is used
                expected = teacher_forced_logprobs(model, prompt, sample.token_ids, 0.8)
                torch.testing.assert_close(sample.log_probs, expected, atol=1e-5, rtol=0)
        # Seeds are per sample: the same seed gives the same samples, and the n samples differ.
        again = engine.generate(PROMPTS, 3, SamplingParams(temperature=0.8, max_new_tokens=10, seed=4))
        assert [s.token_ids for g in again for s in g] == [s.token_ids for g in groups for s in g]
        assert len({tuple(s.token_ids) for s in groups[1]}) > 1
        # length finishes
        long = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=4, ignore_eos=True))
        assert all(s.finish_reason == "length" and len(s.token_ids) == 4 for g in long for s in g)
        # A numeric server weight_version wins over the engine's.
        server.call(setattr, server, "weight_version", "12")
        assert engine.generate([[1]], 1, SamplingParams(max_new_tokens=2))[0][0].weight_version == 12
    finally:
        engine.shutdown()


def test_abort_returns_promptly_with_abort_samples(standin):
    server = standin(token_delay_s=0.05)
    engine = engine_for(server.url, max_concurrency=4)
    try:
        samples = generate_then_abort(engine, 4, SamplingParams(max_new_tokens=200, ignore_eos=True))
        assert len(samples) == 12 and all(s.finish_reason == "abort" for s in samples)
        assert any(len(s.token_ids) > 0 for s in samples)  # partial output of running requests comes back
        assert all(len(s.token_ids) < 200 for s in samples)
        # The engine works normally afterwards.
        assert engine.generate([[1]], 1, SamplingParams(max_new_tokens=2, ignore_eos=True))[0][0].finish_reason == "length"
    finally:
        engine.shutdown()


def test_pause_continue_flush_and_memory(standin):
    server = standin(token_delay_s=0.02, enable_memory_saver=True)
    engine = engine_for(server.url, pause_mode="retract")
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(out=engine.generate([[4, 5]], 2, SamplingParams(max_new_tokens=30, ignore_eos=True))))
        worker.start()
        time.sleep(0.3)
        engine.pause_generation()
        with pytest.raises(RolloutError, match="HTTP 400"):
            engine.flush_cache(timeout_s=0.3)  # requests are still queued on the server
        with pytest.raises(RolloutError, match="not idle"):
            engine.release_memory_occupation(["kv_cache"])
        engine.continue_generation()
        worker.join(30)
        assert [s.finish_reason for s in result["out"][0]] == ["length", "length"]
        engine.flush_cache()
        engine.release_memory_occupation(["weights", "kv_cache"])
        engine.resume_memory_occupation(["weights", "kv_cache"])
        assert engine.generate([[1]], 1, SamplingParams(max_new_tokens=2, ignore_eos=True))[0][0].finish_reason == "length"
    finally:
        engine.shutdown()


def test_schema_error_is_not_retried(standin):
    server = standin()
    engine = engine_for(server.url)
    try:
        with pytest.raises(RolloutError, match="HTTP 400.*top_k"):
            engine.generate([[1]], 1, _bad_sampling())
        assert server.generate_count == 1
    finally:
        engine.shutdown()


def _bad_sampling():
    sampling = SamplingParams()
    object.__setattr__(sampling, "top_k", 0)  # bypass client-side validation: the server must refuse it
    return sampling


def test_weight_update_session_detection_and_helpers(standin):
    new, old = standin(readback_any_model=True), standin(weight_session=False)
    engine_new, engine_old = engine_for(new.url), engine_for(old.url)
    try:
        assert engine_new.begin_weight_update() is True
        engine_new.end_weight_update()
        assert new.session_open is False
        assert engine_old.begin_weight_update() is False
        engine_old.end_weight_update()  # no-op on old servers
        assert engine_old.client.weight_update_session_supported is False
        body = engine_new.get_weights_by_name("model.norm.weight", truncate_size=5)[new.url]
        assert body == tiny_model(0).state_dict()["model.norm.weight"][:5].tolist()
    finally:
        engine_new.shutdown()
        engine_old.shutdown()


def test_api_key_is_sent(standin):
    server = standin(api_key="s3cret")
    assert requests.post(server.url + "/generate", json={"input_ids": [1]}, timeout=10).status_code == 401
    engine = engine_for(server.url, api_key="s3cret")
    wrong = engine_for(server.url, api_key="wrong")
    try:
        assert len(engine.generate([[1]], 2, SamplingParams(max_new_tokens=2))[0]) == 2
        with pytest.raises(RolloutError, match="HTTP 401"):
            wrong.generate([[1]], 1, SamplingParams(max_new_tokens=2))
    finally:
        engine.shutdown()
        wrong.shutdown()


def test_router_gets_generation_workers_get_control(standin):
    router, worker = standin(), standin()
    engine = engine_for(worker.url, router_url=router.url)
    try:
        engine.generate([[1, 2]], 3, SamplingParams(max_new_tokens=2))
        engine.flush_cache()
        assert (router.generate_count, worker.generate_count) == (3, 0)
        assert engine.worker_urls == [worker.url]
    finally:
        engine.shutdown()


def test_use_after_shutdown_is_a_clear_error(standin):
    engine = engine_for(standin().url)
    engine.shutdown()
    engine.shutdown()  # idempotent
    with pytest.raises(RolloutError, match="after shutdown"):
        engine.generate([[1]], 1, SamplingParams(max_new_tokens=1))
