"""Real SGLang (GPU): tensor (CUDA IPC flattened buckets) and distributed (NCCL) transports, verify_weights,
engine log-probs vs the trainer's after a sync, and blockwise FP8 into an FP8 server.

Skipped without CUDA (tests/conftest.py) and without the `sglang` package (except the CUDA-IPC
device-UUID test, which needs only torch). The trainer runs in a child process (world size 1, NCCL);
the server is launched by the test through the rollout package. The model is a Llama: sglang 0.5.23
serves /get_weights_by_name (verify_weights) for Llama-like classes only, not Qwen2/Qwen3.
"""
import pytest
import torch

from tests.helpers.multiproc import run_distributed

pytestmark = pytest.mark.gpu

VOCAB = 512


def _hf_config():
    import transformers

    # head_dim 64: SGLang's attention kernels do not take tiny head sizes; 256 / 512 rows: whole FP8 blocks
    return transformers.LlamaConfig(
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

    from maspo_megatron.checkpoint.hf_weights import load_hf_weights
    from maspo_megatron.config import ModelConfig, ParallelConfig, SGLangConfig, WeightSyncConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.config_builder import build_model_config
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
    if transport == "distributed" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL refuses two ranks of one group on one GPU: the distributed transport needs 2 GPUs")
    (result,) = run_distributed(_trainer_case, 1, bf16_server.worker_urls[0], transport, False, timeout_s=600,
                                device="cuda")
    assert result["report"].verified and result["version"] == "7"
    # bf16 kernels differ between SGLang and Megatron; a wrong or stale weight moves log-probs by far more
    assert (result["engine"] - result["trainer"]).abs().mean() < 0.05


def test_fp8_blockwise_into_fp8_server(tmp_path_factory):
    """The server starts from the FP8 checkpoint tools/write_fp8_checkpoint.py writes; the sync then
    sends quantized weights + weight_scale_inv on the fly."""
    pytest.importorskip("sglang")

    from maspo_megatron.rollout.weight_sync.fp8_checkpoint import write_fp8_checkpoint

    bf16_dir = tmp_path_factory.mktemp("ws_gpu_bf16_model")
    _model(2).save_pretrained(bf16_dir, safe_serialization=True)
    model_dir = tmp_path_factory.mktemp("ws_gpu_fp8_parent") / "fp8"
    write_fp8_checkpoint(str(bf16_dir), str(model_dir))  # what slurm/train_disaggregated.sbatch runs first
    engine = _launch(model_dir, tmp_path_factory.mktemp("ws_gpu_fp8_logs"), quantization="fp8")
    try:
        (result,) = run_distributed(_trainer_case, 1, engine.worker_urls[0], "tensor", True, timeout_s=600, device="cuda")
    finally:
        engine.shutdown()
    assert result["version"] == "7"
    assert (result["engine"] - result["trainer"]).abs().mean() < 0.15  # e4m3 weights vs the bf16 trainer


def _open_payload(payload: str) -> list:
    """Another process: rebuild the payload as SGLang's patched reductions would (UUID -> local index)."""
    from maspo_megatron.rollout.weight_sync.flattened_bucket import load_payload

    return [(name, tensor.float().sum().item(), str(tensor.device)) for name, tensor in load_payload(payload)]


def test_cuda_ipc_payload_names_its_gpu_by_uuid():
    """The handle carries the device UUID, not this process's index: another process (here with the same
    devices; a server may number them differently) maps it back and reads the same memory."""
    import base64
    import multiprocessing

    from maspo_megatron.rollout.weight_sync.flattened_bucket import device_uuid, flatten_tensors, serialize_payload

    device = torch.cuda.current_device()
    named = [("w", torch.arange(12, dtype=torch.bfloat16, device="cuda").reshape(3, 4)),
             ("s", torch.full((5,), 0.5, device="cuda"))]
    buf, metadata = flatten_tensors(named)
    payload = serialize_payload(buf, metadata)
    assert device_uuid(device).encode() in base64.b64decode(payload)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        opened = pool.apply(_open_payload, (payload,))
    del buf  # kept alive until the receiver answered
    assert opened == [("w", 66.0, f"cuda:{device}"), ("s", 2.5, f"cuda:{device}")]
