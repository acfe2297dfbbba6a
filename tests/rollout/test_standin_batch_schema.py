"""The stand-in takes SGLang's batch form of /generate and refuses malformed batches as SGLang does."""
import requests


def post(server, body):
    return requests.post(server.url + "/generate", json=body, timeout=30)


def test_batch_answers_each_item_with_its_own_params(standin):
    server = standin()
    body = {"input_ids": [[1, 2], [3]], "return_logprob": [True, False], "rid": ["a", "b"],
            "sampling_params": [{"max_new_tokens": 3, "ignore_eos": True}, {"max_new_tokens": 5, "ignore_eos": True}]}
    answer = post(server, body)
    assert answer.status_code == 200
    first, second = answer.json()
    assert first["meta_info"]["finish_reason"] == {"type": "length", "length": 3} and len(first["output_ids"]) == 3
    assert [t[1] for t in first["meta_info"]["output_token_logprobs"]] == first["output_ids"]
    assert second["meta_info"]["finish_reason"]["type"] == "length" and len(second["output_ids"]) == 5
    assert "output_token_logprobs" not in second["meta_info"]  # return_logprob false for that item
    assert [first["meta_info"]["id"], second["meta_info"]["id"]] == ["a", "b"]
    assert (first["meta_info"]["prompt_tokens"], second["meta_info"]["prompt_tokens"]) == (2, 1)


def test_batch_with_n_is_prompt_major(standin):
    server = standin(zero_latency=True)
    answer = post(server, {"input_ids": [[1, 2, 3], [4]], "sampling_params": {"n": 2, "max_new_tokens": 2}})
    assert answer.status_code == 200
    assert [r["meta_info"]["prompt_tokens"] for r in answer.json()] == [3, 3, 1, 1]


def test_malformed_batches_are_400(standin):
    server = standin(zero_latency=True)
    cases = {
        "sampling_params: 1 items for a batch of 2": {"input_ids": [[1], [2]], "sampling_params": [{}]},
        "rids length mismatch": {"input_ids": [[1], [2]], "rid": ["x"]},
        "Duplicate request IDs": {"input_ids": [[1], [2]], "rid": ["x", "x"]},
        "max_tokens": {  # SGLang's contract decoder: unknown field `max_tokens` (without its source: the stand-in's)
            "input_ids": [[1], [2]], "sampling_params": [{"max_new_tokens": 2}, {"max_tokens": 2}]},
        "SamplingParams[0]: top_p must be in (0, 1]": {
            "input_ids": [[1], [2]], "sampling_params": [{"top_p": 0}, {}]},
        "parallel_sample_num should be the same": {
            "input_ids": [[1], [2]], "sampling_params": [{"n": 2}, {"n": 1}]},
        "Cannot use list return_logprob with parallel_sample_num > 1": {
            "input_ids": [[1], [2]], "sampling_params": {"n": 2}, "return_logprob": [True, True]},
        "The length of return_logprob (1)": {"input_ids": [[1], [2]], "return_logprob": [True]},
        "a list needs a batch of input_ids": {"input_ids": [1, 2], "sampling_params": [{}]},
        # SGLang's contract decoder: "invalid type: integer `2`, expected a sequence"; the stand-in's own check
        ("input_ids[1]: expected a non-empty list of int", "expected a sequence"): {"input_ids": [[1], 2]},
        "unexpected field(s) ['return_logprobs']": {"input_ids": [[1], [2]], "return_logprobs": True},
    }
    for message, body in cases.items():
        answer = post(server, body)
        assert answer.status_code == 400, (message, answer.text)
        accepted = message if isinstance(message, tuple) else (message,)
        assert any(m in answer.json()["message"] for m in accepted), (message, answer.json()["message"])
    assert server.generate_items == 0
