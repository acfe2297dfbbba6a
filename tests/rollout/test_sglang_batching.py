"""Batched /generate (rollout.sglang.samples_per_request): same samples as one request per sample,
per-item finish reasons, samples-in-flight bound, whole-group retry when a server dies, abort."""
import threading
import time

import pytest
import requests
import torch

from maspo_megatron.rollout import RolloutError, SamplingParams
from maspo_megatron.rollout.local.sampling import sequence_seed
from maspo_megatron.rollout.sglang.protocol import generate_payload
from maspo_megatron.utils.ports import free_port
from tests.helpers.sglang_standin.process import kill, spawn, wait_healthy
from tests.rollout.conftest import EOS_ID, PROMPTS, engine_for, flat, generate_then_abort


def test_batched_samples_equal_per_sample_requests(standin):
    """n > 1, seeded: batches of up to 32 give exactly the samples of one request per sample, and a
    batch mixes stop and length finishes item by item."""
    server = standin()
    batched, single = engine_for(server.url), engine_for(server.url, samples_per_request=1)
    # About a quarter of the vocabulary stops: within 5 tokens some samples stop and some run out.
    sampling = SamplingParams(temperature=0.9, max_new_tokens=5, seed=11, stop_token_ids=tuple(range(40, 56)))
    try:
        assert batched.client.samples_per_request == 32
        got = batched.generate(PROMPTS, 4, sampling)
        assert (server.generate_count, server.generate_items) == (1, 12)  # one batch of 12 items
        want = single.generate(PROMPTS, 4, sampling)
        assert (server.generate_count, server.generate_items) == (13, 24)
        assert [len(g) for g in got] == [4, 4, 4]
        for a, b in zip(flat(got), flat(want), strict=True):
            assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
            torch.testing.assert_close(a.log_probs, b.log_probs, atol=0, rtol=0)
        reasons = {s.finish_reason for s in flat(got)}
        assert reasons == {"stop", "length"}, reasons
        for sample in flat(got):
            stopped = sample.token_ids[-1] in range(40, 56) or sample.token_ids[-1] == EOS_ID
            assert (sample.finish_reason == "stop") == stopped
            assert sample.finish_reason == "stop" or len(sample.token_ids) == 5
        assert len({tuple(s.token_ids) for s in got[1]}) > 1  # per-sample seeds inside one batch
        # Sample s of prompt p is the one a lone request with that prompt and seed gets (order and seeds).
        for p, s in [(0, 0), (1, 3), (2, 1)]:
            body = generate_payload(PROMPTS[p], sampling, sequence_seed(11, p, s))
            alone = requests.post(server.url + "/generate", json=body, timeout=30).json()
            assert got[p][s].token_ids == alone["output_ids"]
    finally:
        batched.shutdown()
        single.shutdown()


def test_concurrency_counts_samples_and_servers_share_small_calls(standin):
    a = standin(zero_latency=True, response_delay_s=0.2)
    b = standin(zero_latency=True, response_delay_s=0.2)
    engine = engine_for(a.url, b.url, max_concurrency=10, samples_per_request=4)
    try:
        groups = engine.generate([[1, 2]] * 40, 1, SamplingParams(max_new_tokens=3))
        assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == 3 for g in groups)
        assert a.generate_items + b.generate_items == 40 and a.generate_items > 0 and b.generate_items > 0
        assert a.max_items_in_flight + b.max_items_in_flight <= 10  # samples, not requests
        assert max(a.max_items_in_flight, b.max_items_in_flight) >= 4  # batches really went out
        # A small call is spread over both servers instead of riding in one batch.
        before = (a.generate_items, b.generate_items)
        engine.generate([[3]], 6, SamplingParams(max_new_tokens=2))
        assert (a.generate_items - before[0], b.generate_items - before[1]) == (3, 3)
    finally:
        engine.shutdown()


def test_server_killed_mid_batch_group_retried_then_clear_error():
    ports = [free_port(), free_port()]
    processes = [spawn(port, "--zero-latency", "--response-delay-s", "1.0") for port in ports]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    engine = None
    try:
        for url, process in zip(urls, processes, strict=True):
            wait_healthy(url, process)
        engine = engine_for(*urls, samples_per_request=8, max_retries=2, request_timeout_s=30)
        result = {}
        worker = threading.Thread(target=lambda: result.update(
            out=engine.generate([[4, 5, 6]] * 32, 1, SamplingParams(max_new_tokens=4))))
        worker.start()
        time.sleep(0.4)  # 4 batches of 8 in flight, 2 on each server
        kill(processes[0])
        worker.join(30)
        assert not worker.is_alive(), "generate() hung after a server died mid-batch"
        assert all(g[0].finish_reason == "length" and len(g[0].token_ids) == 4 for g in result["out"])
        kill(processes[1])
        started = time.monotonic()
        with pytest.raises(RolloutError, match=r"/generate \(8 samples\) failed 3 times"):
            engine.generate([[4]] * 16, 1, SamplingParams(max_new_tokens=4))
        assert time.monotonic() - started < 20
    finally:
        if engine is not None:
            engine.shutdown()
        for process in processes:
            kill(process)


def test_abort_of_batched_requests(standin):
    server = standin(token_delay_s=0.05)
    engine = engine_for(server.url, max_concurrency=8, samples_per_request=4)
    try:
        samples = generate_then_abort(engine, 4, SamplingParams(max_new_tokens=200, ignore_eos=True))
        assert len(samples) == 12 and all(s.finish_reason == "abort" for s in samples)
        assert sum(len(s.token_ids) > 0 for s in samples) >= 8  # both running batches answer per item
        assert server.generate_count == 2  # the third group never went out (budget of 8 samples)
        again = engine.generate([[1]], 5, SamplingParams(max_new_tokens=2, ignore_eos=True))
        assert [s.finish_reason for s in again[0]] == ["length"] * 5
    finally:
        engine.shutdown()


def test_unexpected_batch_answer_is_a_clear_error():
    from maspo_megatron.rollout.sglang.protocol import parse_batch_response

    with pytest.raises(RolloutError, match="a batch of 3 items was answered with a list of 2 results"):
        parse_batch_response([{}, {}], 3, url="http://x", default_weight_version=0)
    with pytest.raises(RolloutError, match="answered with dict"):
        parse_batch_response({"meta_info": {}}, 2, url="http://x", default_weight_version=0)


def test_malformed_results_name_the_bad_entry():
    from maspo_megatron.rollout.sglang.protocol import parse_generate_response

    def parse(triples, output_ids=None):
        body = {"meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": triples}}
        if output_ids is not None:
            body["output_ids"] = output_ids
        return parse_generate_response(body, url="http://x", default_weight_version=7)

    sample = parse([[-0.5, 4, None], [-1, 9, "a"]], [4, 9])
    assert sample.token_ids == [4, 9] and sample.log_probs.tolist() == [-0.5, -1.0] and sample.weight_version == 7
    assert parse([]).token_ids == []
    for triples, message in [([[-0.5, 1]], r"output_token_logprobs\[0\] = \[-0.5, 1\]"),
                             ([[None, 1, None]], r"output_token_logprobs\[0\] = \[None, 1, None\]"),
                             ([[-0.5, 1, None], [-1, 2]], r"output_token_logprobs\[1\]"),
                             ([["x", 1, None]], "bad output_token_logprobs"),
                             ([5], r"output_token_logprobs\[0\] = 5")]:
        with pytest.raises(RolloutError, match=message):
            parse(triples)
    with pytest.raises(RolloutError, match="output_ids and output_token_logprobs disagree"):
        parse([[-0.5, 4, None]], [5])


def test_encoded_requests_are_the_documented_bodies():
    import json

    import numpy as np

    from maspo_megatron.rollout.sglang.protocol import encode_items, encode_request, sampling_dict

    sampling = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=6, stop_token_ids=(3, 4), ignore_eos=True)
    prompts = [[5, 6, 7], np.array([8, 9])]  # numpy ints must become plain JSON ints
    seeds = [[11, 12], [13, 2**62]]
    items = encode_items(prompts, 2, sampling, seeds)
    expected = [([5, 6, 7], sampling_dict(sampling, 11)), ([5, 6, 7], sampling_dict(sampling, 12)),
                ([8, 9], sampling_dict(sampling, 13)), ([8, 9], sampling_dict(sampling, 2**62))]
    # the batch form of GenerateReqInput: parallel lists, one sampling dict per item
    assert json.loads(encode_request(items)) == {"input_ids": [ids for ids, _ in expected],
                                                 "sampling_params": [params for _, params in expected],
                                                 "return_logprob": True}
    assert json.loads(encode_request(items[3:])) == generate_payload([8, 9], sampling, 2**62)
    unseeded = encode_items([[1]], 1, SamplingParams(max_new_tokens=2), None)
    assert json.loads(encode_request(unseeded)) == generate_payload([1], SamplingParams(max_new_tokens=2))
    assert "sampling_seed" not in json.loads(encode_request(unseeded))["sampling_params"]


def test_sample_budget_is_fifo_and_cancel_safe():
    import asyncio

    from maspo_megatron.rollout.sglang.client import SampleBudget

    async def scenario():
        budget = SampleBudget(4)
        await budget.acquire(3)
        big = asyncio.ensure_future(budget.acquire(2))
        small = asyncio.ensure_future(budget.acquire(1))
        await asyncio.sleep(0)
        assert not big.done() and not small.done()  # 1 place is free, but the 2-group queued first
        big.cancel()
        await asyncio.wait_for(small, 5)  # the cancelled head no longer blocks the queue
        assert big.cancelled() and budget.available == 0
        budget.release(3)
        assert budget.available == 3
        again = asyncio.ensure_future(budget.acquire(4))
        await asyncio.sleep(0)
        assert not again.done()
        budget.release(1)
        await asyncio.wait_for(again, 5)
        assert budget.available == 0

    asyncio.run(scenario())
