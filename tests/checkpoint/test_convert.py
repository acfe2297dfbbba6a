"""HF -> Megatron -> HF round trips (bit-exact) and logits parity of converted checkpoints with
`transformers` at TP {1, 2} x PP {1, 2}, including loads at another TP/PP than the conversion's."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from maspo_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
from tests.checkpoint._cases import parity_case
from tests.helpers.hf_models import VARIANTS, hf_logits, save_hf_model
from tests.helpers.multiproc import run_distributed

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
# (variant, conversion tp, conversion pp)
CONVERSIONS = {name: (1 if name.endswith("gqa1") else 2, 2) for name in VARIANTS}


def _read_hf_dir(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        loaded = load_file(path / shard)
        assert set(loaded) == {k for k, v in index.items() if v == shard}, f"{shard}: index and file disagree"
        tensors.update(loaded)
    return tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (hf model, hf dir, megatron dir)}, plus 'qwen2@tp1': qwen2 converted at TP1 PP1."""
    root = tmp_path_factory.mktemp("conv")
    out = {}
    for name, (tp, pp) in CONVERSIONS.items():
        model = save_hf_model(name, root / f"{name}_hf")
        hf_to_megatron(root / f"{name}_hf", root / f"{name}_meg", tp=tp, pp=pp, progress=False)
        out[name] = (model, root / f"{name}_hf", root / f"{name}_meg")
    hf_to_megatron(root / "qwen2_hf", root / "qwen2_meg_tp1", tp=1, pp=1, progress=False)
    out["qwen2@tp1"] = (out["qwen2"][0], root / "qwen2_hf", root / "qwen2_meg_tp1")
    return out


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_is_bit_exact_and_index_complete(converted, name, tmp_path):
    model, hf_dir, meg_dir = converted[name]
    back = megatron_to_hf(meg_dir, tmp_path / "back", max_shard_bytes=50_000, progress=False)
    source = {}
    for shard in sorted(p for p in hf_dir.iterdir() if p.suffix == ".safetensors"):
        source.update(load_file(shard))
    result = _read_hf_dir(back)
    assert sorted(result) == sorted(source)
    for key, tensor in source.items():
        assert result[key].dtype == tensor.dtype, key
        assert torch.equal(result[key], tensor), f"{key} differs after the round trip"
    shards = sorted(p.name for p in back.glob("*.safetensors"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_dir / "config.json").read_text())
    assert (back / "generation_config.json").is_file()
    assert not list(tmp_path.glob(".*partial*"))


def test_dtype_cast_both_ways(converted, tmp_path):
    model, hf_dir, _ = converted["qwen2"]
    meg = hf_to_megatron(hf_dir, tmp_path / "meg_bf16", tp=1, pp=1, dtype="bf16", progress=False)
    back = megatron_to_hf(meg, tmp_path / "back", progress=False)
    result = _read_hf_dir(back)
    for key, tensor in model.state_dict().items():
        assert result[key].dtype == torch.bfloat16
        assert torch.equal(result[key], tensor.to(torch.bfloat16)), key
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    fp32_back = megatron_to_hf(meg, tmp_path / "back32", dtype="fp32", progress=False)
    assert all(t.dtype == torch.float32 for t in _read_hf_dir(fp32_back).values())


def test_logits_match_transformers_at_every_tp_pp(converted, tmp_path):
    torch.manual_seed(3)
    cases, refs = [], {}
    for name in [*VARIANTS, "qwen2@tp1"]:
        model, hf_dir, meg_dir = converted[name]
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 12))
        cases.append({"name": name, "hf_config": str(hf_dir), "ckpt": str(meg_dir), "ids": ids,
                      "tps": (1,) if name.endswith("gqa1") else (1, 2)})
        if name == "llama":  # tied embeddings: the last PP stage holds a copy of the embedding
            cases[-1]["direct"] = True
        if name == "qwen2":
            (tmp_path / "megatron_saved").mkdir()
            cases[-1].update(save_to=str(tmp_path / "megatron_saved"), save_at=(2, 2))
        refs[name] = hf_logits(model, ids)
    results = {}
    for rank_result in run_distributed(parity_case, 4, cases, LAYOUTS, timeout_s=300):
        results.update(rank_result)
    for case in cases:
        for tp, pp in LAYOUTS:
            if tp not in case["tps"]:
                continue
            key = (case["name"], tp, pp)
            assert key in results, f"no logits for {key}"
            ref, got = refs[case["name"]], results[key]
            assert got.shape == ref.shape, key
            rel = ((got - ref).abs().max() / ref.abs().max()).item()
            assert rel < 1e-4, f"{key}: max relative error {rel:.2e}"
            assert ref.abs().max() > 1.0, "reference logits too small to be a meaningful check"
    # HF weights loaded straight into the sharded model (no checkpoint) give the same logits, and
    # exporting them back (TP gather + table) yields exactly the HF tensors, every PP stage together
    llama_state = converted["llama"][0].state_dict()
    llama_ref = refs["llama"]
    for tp, pp in LAYOUTS:
        got = results[("llama@direct", tp, pp)]
        assert ((got - llama_ref).abs().max() / llama_ref.abs().max()).item() < 1e-4, (tp, pp)
        exported = {}
        for stage in range(pp):
            part = results[("export", "llama", tp, pp, stage)]
            assert not set(part) & set(exported), "a tensor exported by two PP stages"
            exported.update(part)
        assert sorted(exported) == sorted(k for k in llama_state if k != "lm_head.weight")
        assert all(torch.equal(exported[k], llama_state[k]) for k in exported), (tp, pp)
    # a checkpoint saved by Megatron itself at TP2 PP2 converts back to the original HF weights
    back = megatron_to_hf(tmp_path / "megatron_saved", tmp_path / "back", hf_config_dir=converted["qwen2"][1], progress=False)
    result = _read_hf_dir(back)
    source = converted["qwen2"][0].state_dict()
    assert sorted(result) == sorted(source)
    assert all(torch.equal(result[k], source[k]) for k in source)
