"""Real SGLang (GPU): tensor (CUDA IPC flattened buckets) and distributed (NCCL) transports, verify_weights,
engine log-probs vs the trainer's after a sync, and blockwise FP8 into an FP8 server.

Skipped without CUDA (tests/conftest.py) and without the `sglang` package. The trainer runs in a
child process (world size 1, NCCL); the server is launched by the test through the rollout package.
"""
import pytest
import torch

from tests.helpers.multiproc import run_distributed

pytestmark = pytest.mark.gpu

VOCAB = 512


def _hf_config():
    import transformers

    # head_dim 64: SGLang's attention kernels do not take tiny head sizes
    return transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, eos_token_id=2, tie_word_embeddings=False)


def _model(seed):
    import transformers

    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(_hf_config()).to(torch.bfloat16)


def _launch(model_dir, log_dir, quantization=None):
    from maspo_megatron.config import SGLangConfig
    from maspo_megatron.rollout.sglang import SGLangEngine

    cfg = SGLangConfig(num_servers=1, mem_fraction_static=0.2, startup_timeout_s=600, quantization=quantization,
                       extra_args=["--skip-tokenizer-init", "--disable-cuda-graph"], log_dir=str(log_dir),
                       request_timeout_s=120)
    return SGLangEngine(cfg, model_path=str(model_dir))


def _trainer_case(url: str, transport: str, fp8: bool) -> dict:
    """World size 1 on the GPU: policy = HF model seed 1 (the server starts from seed 2), sync, compare."""
    import dataclasses

    from maspo_megatron.config import ModelConfig, ParallelConfig, SGLangConfig, WeightSyncConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.hf_loader import load_hf_weights
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.rollout import SamplingParams
    from maspo_megatron.rollout.sglang import SGLangEngine
    from maspo_megatron.rollout.weight_sync.syncer import WeightSyncer

    parallel = ParallelConfig()
    dims = init_distributed(parallel, seed=1)
    config, meta = build_model_config(_hf_config(), ModelConfig(dtype="bf16"), parallel)
    chunk = gpt_model_provider(config, meta).cuda()
    wmap = WeightMap.from_hf_config(_hf_config())
    reference = {k: v.cuda() for k, v in _model(1).state_dict().items()}
    load_hf_weights(chunk, wmap, reference.__getitem__, 0, 1)
    engine = SGLangEngine(dataclasses.replace(SGLangConfig(), urls=[url]))
    cfg = WeightSyncConfig(transport=transport, bucket_bytes=200_000, verify_weights=not fp8, fp8=fp8)
    syncer = WeightSyncer(cfg, [chunk], wmap, dims, engine=engine, engine_kind="sglang")
    report = syncer.sync(weight_version=7)
    prompt = [5, 6, 7, 8]
    sample = engine.generate([prompt], 1, SamplingParams(max_new_tokens=16, ignore_eos=True))[0][0]
    ids = torch.tensor([prompt + sample.token_ids], device="cuda")
    length = ids.shape[1]
    causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device="cuda"), 1)[None, None]
    with torch.no_grad():
        logits = chunk(ids, torch.arange(length, device="cuda")[None], causal)[0].float()
    logits[:, VOCAB:] = float("-inf")  # Megatron's padded vocab rows
    trainer = torch.log_softmax(logits, -1)[len(prompt) - 1:-1].gather(
        -1, torch.tensor(sample.token_ids, device="cuda")[:, None]).squeeze(-1).cpu()
    out = {"report": report, "engine": sample.log_probs, "trainer": trainer,
           "version": next(iter(engine.get("/model_info").values()))["weight_version"]}
    syncer.close()
    engine.shutdown()
    return out


@pytest.fixture(scope="module")
def bf16_server(tmp_path_factory):
    pytest.importorskip("sglang")
    model_dir = tmp_path_factory.mktemp("ws_gpu_model")
    _model(2).save_pretrained(model_dir, safe_serialization=True)
    engine = _launch(model_dir, tmp_path_factory.mktemp("ws_gpu_logs"))
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("transport", ["tensor", "distributed"])
def test_sync_into_real_sglang(bf16_server, transport):
    (result,) = run_distributed(_trainer_case, 1, bf16_server.worker_urls[0], transport, False, timeout_s=600)
    assert result["report"].verified and result["version"] == "7"
    # bf16 kernels differ between SGLang and Megatron; a wrong or stale weight moves log-probs by far more
    assert (result["engine"] - result["trainer"]).abs().mean() < 0.05


def test_fp8_blockwise_into_fp8_server(tmp_path_factory):
    """The server starts from an FP8 checkpoint written in the HF layout by our quantizer; the sync
    then sends quantized weights + weight_scale_inv on the fly."""
    pytest.importorskip("sglang")
    import json

    from safetensors.torch import save_file

    from maspo_megatron.rollout.weight_sync.fp8 import fp8_stream, quantization_config

    model_dir = tmp_path_factory.mktemp("ws_gpu_fp8_model")
    model = _model(2)
    model.config.save_pretrained(model_dir)
    quantized = {n: t.contiguous() for n, t, _ in fp8_stream((n, t, None) for n, t in model.state_dict().items())}
    save_file(quantized, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = quantization_config()
    (model_dir / "config.json").write_text(json.dumps(config))
    engine = _launch(model_dir, tmp_path_factory.mktemp("ws_gpu_fp8_logs"), quantization="fp8")
    try:
        (result,) = run_distributed(_trainer_case, 1, engine.worker_urls[0], "tensor", True, timeout_s=600)
    finally:
        engine.shutdown()
    assert result["version"] == "7"
    assert (result["engine"] - result["trainer"]).abs().mean() < 0.15  # e4m3 weights vs the bf16 trainer
