"""TP-sliced HF loading (`load_hf_weights` with an `HFCheckpointReader`): each rank reads only its
slices, and gets exactly the parameters the full-tensor path gives, for the four families at
TP 1/2 (and a tied output layer on the last PP stage); logits match `transformers`; at TP2 a rank
reads about half of the checkpoint's bytes."""
from __future__ import annotations

import pytest
import torch

from tests.helpers.hf_models import VARIANTS, hf_logits, save_hf_model
from tests.helpers.multiproc import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2)]  # (tp, pp) at world size 2


def _build(hf_dir: str, tp: int, pp: int, dtype: str = "fp32"):
    from megatron.core import parallel_state as ps

    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider

    config, meta = build_model_config(hf_dir, ModelConfig(dtype=dtype), ParallelConfig(tp=tp, pp=pp))
    model = gpt_model_provider(config, meta, pre_process=ps.is_pipeline_first_stage(),
                               post_process=ps.is_pipeline_last_stage()).eval()
    return model, meta


def _sliced_case(cases: list[dict], bytes_case: dict) -> dict:
    """Per layout and case: params of the sliced load vs the full-tensor load (equal?), logits of the
    sliced load (last stage, TP rank 0), bytes read; then the bytes-per-rank case at TP2."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
    from maspo_megatron.checkpoint.hf_weights import load_hf_weights
    from maspo_megatron.config import ParallelConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.parallel.state import init_distributed
    from tests.checkpoint._cases import forward_logits

    init_distributed(ParallelConfig(), seed=1)
    out = {}
    for tp, pp in LAYOUTS:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
        model_parallel_cuda_manual_seed(1)
        tp_rank = ps.get_tensor_model_parallel_rank()
        for case in cases:
            if tp not in case["tps"]:
                continue
            wmap = WeightMap.from_hf_config(case["hf_dir"], tp=tp)
            sliced, meta = _build(case["hf_dir"], tp, pp)
            full, _ = _build(case["hf_dir"], tp, pp)
            with torch.no_grad():  # start from different values, so a parameter left unread shows
                for a, b in zip(sliced.parameters(), full.parameters(), strict=True):
                    a.fill_(7.0)
                    b.fill_(-7.0)
            reader = HFCheckpointReader(case["hf_dir"])
            load_hf_weights(sliced, wmap, reader, tp_rank, tp)
            load_hf_weights(full, wmap, HFCheckpointReader(case["hf_dir"]).get, tp_rank, tp)
            unequal = [name for (name, a), (_, b) in zip(sliced.named_parameters(), full.named_parameters(), strict=True)
                       if not torch.equal(a, b)]
            key = (case["name"], tp, pp)
            out[("unequal", *key)] = unequal
            out[("params", *key)] = len(list(sliced.parameters()))
            logits = forward_logits(sliced, case["ids"], case["ids"].shape[1])
            if logits is not None and tp_rank == 0:
                out[("logits", *key)] = logits[..., : meta.vocab_size].clone()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=2, pipeline_model_parallel_size=1)
    model_parallel_cuda_manual_seed(1)
    model, _ = _build(bytes_case["hf_dir"], 2, 1, dtype="bf16")
    reader = HFCheckpointReader(bytes_case["hf_dir"])
    load_hf_weights(model, WeightMap.from_hf_config(bytes_case["hf_dir"], tp=2), reader,
                    ps.get_tensor_model_parallel_rank(), 2)
    out["bytes_read_tp2"] = reader.bytes_read
    return out


def _checkpoint_tensor_bytes(hf_dir) -> int:
    from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader

    reader = HFCheckpointReader(hf_dir)
    total = 0
    for name in reader.names():
        shape, dtype = reader.shape_dtype(name)
        total += torch.Size(shape).numel() * dtype.itemsize
    return total


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("sliced")
    models = {name: (save_hf_model(name, root / name), root / name) for name in VARIANTS}
    # a larger Qwen2 (vocab 4,000, bf16) for the bytes figure: the tiny variants' vocab padding
    # (to 128 x TP rows) would dominate their split
    import transformers

    config = transformers.Qwen2Config(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    big = transformers.AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    big.save_pretrained(root / "qwen2_bytes", safe_serialization=True, max_shard_size="1MB")
    return models, root / "qwen2_bytes"


def test_sliced_load_equals_full_load_and_reads_half_at_tp2(saved, capsys):
    models, bytes_dir = saved
    torch.manual_seed(3)
    cases, refs = [], {}
    for name, (model, hf_dir) in models.items():
        ids = torch.randint(0, model.config.vocab_size, (2, 10))
        cases.append({"name": name, "hf_dir": str(hf_dir), "ids": ids,
                      "tps": (1,) if name.endswith("gqa1") else (1, 2)})
        refs[name] = hf_logits(model, ids)
    results = run_distributed(_sliced_case, 2, cases, {"hf_dir": str(bytes_dir)}, timeout_s=400)
    merged = {}
    for result in results:
        for key, value in result.items():
            if key[0] == "logits":
                merged[key] = value
    for case in cases:
        for tp, pp in LAYOUTS:
            if tp not in case["tps"]:
                continue
            key = (case["name"], tp, pp)
            for rank, result in enumerate(results):
                assert result[("unequal", *key)] == [], f"{key} rank {rank}: sliced load differs from the full load"
                assert result[("params", *key)] > 0
            ref, got = refs[case["name"]], merged[("logits", *key)]
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-4, f"{key}: max relative error {rel:.2e} against transformers"
    total = _checkpoint_tensor_bytes(bytes_dir)
    fractions = [r["bytes_read_tp2"] / total for r in results]
    with capsys.disabled():
        print(f"\nTP2 init_from_hf bytes read per rank: {', '.join(f'{f:.3f}' for f in fractions)} "
              f"of the checkpoint's {total / 1e6:.2f} MB of tensors")
    assert max(fractions) <= 0.55, fractions
    assert sum(fractions) >= 1.0 - 1e-9  # together the ranks read everything (replicated norms twice)
