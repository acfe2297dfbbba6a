"""Fixtures for rollout tests: a tiny Qwen2 checkpoint on disk and in-process SGLang stand-ins."""
import threading
import time

import pytest
import torch

EOS_ID = 3
PROMPTS = [[5, 6, 7], [8, 9, 10, 11], [12]]  # for the SGLang client tests


def engine_for(*urls, **overrides):
    """An SGLangEngine on `urls` with test-sized timeouts (overridable)."""
    from maspo_megatron.config import SGLangConfig
    from maspo_megatron.rollout.sglang import SGLangEngine

    settings = {"request_timeout_s": 60, "connect_timeout_s": 5, "abort_grace_s": 3, **overrides}
    return SGLangEngine(SGLangConfig(urls=list(urls), **settings))


def flat(groups):
    return [s for g in groups for s in g]


def generate_then_abort(engine, n, sampling, after_s=0.6):
    """`engine.generate(PROMPTS, n, sampling)` in a thread, `engine.abort()` after `after_s`; checks that
    generate() returns within 5 s of the abort -> its samples, flattened."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=engine.generate(PROMPTS, n, sampling)))
    worker.start()
    time.sleep(after_s)
    started = time.monotonic()
    engine.abort()
    worker.join(20)
    assert not worker.is_alive(), "generate() did not return after abort()"
    assert time.monotonic() - started < 5
    return flat(result["out"])


def tiny_config():
    import transformers

    return transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, eos_token_id=EOS_ID, tie_word_embeddings=False,
    )


def tiny_model(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config()).float().eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_model(0).save_pretrained(path, safe_serialization=True)
    return str(path)


@pytest.fixture
def standin(tiny_model_dir):
    """Factory: standin(**kwargs) -> a started in-process StandinServer (stopped after the test)."""
    from tests.helpers.sglang_standin import StandinServer

    servers = []

    def make(**kwargs):
        kwargs.setdefault("model_path", None if kwargs.get("zero_latency") else tiny_model_dir)
        server = StandinServer(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
