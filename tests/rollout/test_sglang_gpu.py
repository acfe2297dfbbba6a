"""A real SGLang server (GPU): generation with log-probs, pause/continue, memory release/resume.

Skipped without CUDA (tests/conftest.py) and without the `sglang` package.
"""
import threading
import time

import pytest
import torch

from maspo_megatron.config import SGLangConfig
from maspo_megatron.rollout import SamplingParams
from maspo_megatron.rollout.sglang import SGLangEngine

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_model_dir(tmp_path_factory):
    pytest.importorskip("sglang")
    import transformers

    # head_dim 64: the attention kernels SGLang uses do not take tiny head sizes.
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("gpu_tiny_qwen2")
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def engine(gpu_model_dir, tmp_path_factory):
    cfg = SGLangConfig(
        num_servers=1, mem_fraction_static=0.2, enable_memory_saver=True, startup_timeout_s=600,
        extra_args=["--skip-tokenizer-init", "--disable-cuda-graph"], log_dir=str(tmp_path_factory.mktemp("sglang_logs")),
        request_timeout_s=120,
    )
    engine = SGLangEngine(cfg, model_path=gpu_model_dir)
    yield engine
    engine.shutdown()


def test_generate_with_logprobs_matches_hf(engine, gpu_model_dir):
    import transformers

    prompts = [[5, 6, 7, 8], [9, 10]]
    groups = engine.generate(prompts, 2, SamplingParams(temperature=0.7, max_new_tokens=16, ignore_eos=True))
    model = transformers.AutoModelForCausalLM.from_pretrained(gpu_model_dir).to(torch.bfloat16).cuda().eval()
    for prompt, group in zip(prompts, groups, strict=True):
        for sample in group:
            assert sample.finish_reason == "length" and len(sample.token_ids) == 16
            ids = torch.tensor([prompt + sample.token_ids], device="cuda")
            with torch.no_grad():
                logits = model(input_ids=ids).logits[0].float()
            expected = torch.log_softmax(logits / 0.7, -1)[len(prompt) - 1 : -1].gather(
                -1, torch.tensor(sample.token_ids, device="cuda")[:, None]).squeeze(-1).cpu()
            # bf16 kernels differ between SGLang and HF: a loose bound, far below a wrong-temperature error.
            assert (sample.log_probs - expected).abs().mean() < 0.05


def test_pause_continue_and_memory(engine):
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        out=engine.generate([[3, 4, 5]], 4, SamplingParams(max_new_tokens=400, ignore_eos=True))))
    worker.start()
    time.sleep(0.5)
    engine.pause_generation(mode="retract")
    time.sleep(0.5)
    engine.continue_generation()
    worker.join(120)
    assert [s.finish_reason for s in result["out"][0]] == ["length"] * 4
    engine.flush_cache()
    engine.release_memory_occupation(["kv_cache", "weights"])
    engine.resume_memory_occupation(["kv_cache", "weights"])
    again = engine.generate([[3, 4, 5]], 1, SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert again[0][0].finish_reason == "length"


def test_batched_generate_request(engine):
    """SGLang's batch form: per-item sampling params and seeds, one result per item in order; and the
    client's batching (samples_per_request) against the real server."""
    import requests

    url = engine.worker_urls[0]
    body = {"input_ids": [[5, 6, 7], [9, 10]], "return_logprob": True,
            "sampling_params": [{"max_new_tokens": 3, "ignore_eos": True, "sampling_seed": 1},
                                {"max_new_tokens": 5, "ignore_eos": True, "sampling_seed": 2}]}
    answer = requests.post(url + "/generate", json=body, timeout=120)
    assert answer.status_code == 200, answer.text
    results = answer.json()
    assert isinstance(results, list) and len(results) == 2
    for result, length in zip(results, (3, 5), strict=True):
        meta = result["meta_info"]
        assert meta["finish_reason"]["type"] == "length" and len(result["output_ids"]) == length
        assert [t[1] for t in meta["output_token_logprobs"]] == result["output_ids"]
    mismatch = dict(body, sampling_params=body["sampling_params"] + [{}])  # a real server must not hang on it
    assert requests.post(url + "/generate", json=dict(mismatch, rid=["a"]), timeout=120).status_code == 400
    assert engine.client.samples_per_request > 1
    groups = engine.generate([[3, 4, 5], [6, 7]], 4, SamplingParams(max_new_tokens=6, ignore_eos=True, seed=3))
    assert [len(g) for g in groups] == [4, 4]
    assert all(s.finish_reason == "length" and len(s.token_ids) == 6 for g in groups for s in g)
