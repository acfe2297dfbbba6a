"""Fixtures for rollout tests: a tiny Qwen2 checkpoint on disk and in-process SGLang stand-ins."""
from pathlib import Path

import pytest
import torch

STANDIN_SCRIPT = str(Path(__file__).resolve().parents[1] / "helpers" / "sglang_standin")
EOS_ID = 3


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
