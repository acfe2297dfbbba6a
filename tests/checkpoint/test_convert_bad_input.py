"""Bad input to the converters: clear errors naming the file/tensor, no output left behind, and
pickled objects refused (never executed)."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from maspo_megatron.checkpoint.byte_copy import SegmentCopier
from maspo_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf
from maspo_megatron.checkpoint.errors import CheckpointError
from tests.helpers.hf_models import build_hf_model, save_hf_model


class _Evil:
    """Unpickling this runs code that creates `marker` (a harmless stand-in for an attack)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _no_output(out: Path) -> None:
    assert not out.exists(), f"{out} left behind"
    assert not list(out.parent.glob(f".{out.name}*")), "temporary directory left behind"


@pytest.fixture(scope="module")
def qwen2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    save_hf_model("qwen2", root / "hf")
    hf_to_megatron(root / "hf", root / "meg", tp=1, pp=1, progress=False)
    return root / "hf", root / "meg"


def _edit_config(hf: Path, **changes) -> None:
    cfg = json.loads((hf / "config.json").read_text())
    cfg.update(changes)
    (hf / "config.json").write_text(json.dumps(cfg))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_shard_names_the_file(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    victim = sorted(hf.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_missing_tensor_names_the_tensor(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.k_proj.bias"
    shard = hf / index["weight_map"].pop(name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard)
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_proj\.bias: tensor missing"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_unsupported_family_is_named(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    _edit_config(hf, model_type="gpt2")
    with pytest.raises(ValueError, match=r"model_type: 'gpt2' is not a supported family"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_config_shape_mismatch_names_tensor_and_file(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    _edit_config(hf, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight: shape \(96, 64\) in .*safetensors"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_tensor_without_rule_is_refused(qwen2_dirs, tmp_path):
    """A Qwen3-style q_norm in a Qwen2 checkpoint means config and weights disagree."""
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    save_file({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, hf / "extra.safetensors")
    index["weight_map"]["model.layers.0.self_attn.q_norm.weight"] = "extra.safetensors"
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"q_norm\.weight: tensor in .*extra\.safetensors has no qwen2 mapping rule"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")


def test_megatron_side_shape_mismatch_and_missing_config(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "cfg")
    _edit_config(hf, intermediate_size=128)
    with pytest.raises(CheckpointError, match=r"decoder\.layers\.mlp\.linear_fc1\.weight: shape \(4, 192, 64\)"):
        megatron_to_hf(qwen2_dirs[1], tmp_path / "out", hf_config_dir=hf, progress=False)
    _no_output(tmp_path / "out")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(CheckpointError, match=r"bare/config\.json: missing"):
        megatron_to_hf(qwen2_dirs[1], tmp_path / "out", hf_config_dir=bare, progress=False)
    _no_output(tmp_path / "out")


def test_existing_output_dir_is_refused(qwen2_dirs, tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(CheckpointError, match="already exists"):
        hf_to_megatron(qwen2_dirs[0], tmp_path / "out", progress=False)


@pytest.mark.parametrize("direction", ["hf->meg", "meg->hf"])
def test_failure_while_writing_leaves_nothing(qwen2_dirs, tmp_path, monkeypatch, direction):
    calls = {"n": 0}
    original = SegmentCopier.copy  # every tensor's bytes go through it (kernel file-to-file copy)

    def failing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SegmentCopier, "copy", failing)
    with pytest.raises(OSError, match="simulated"):
        if direction == "hf->meg":
            hf_to_megatron(qwen2_dirs[0], tmp_path / "out", progress=False)
        else:
            megatron_to_hf(qwen2_dirs[1], tmp_path / "out", progress=False)
    assert calls["n"] == 7
    _no_output(tmp_path / "out")


def test_pickled_object_in_bin_checkpoint_is_refused_not_run(tmp_path):
    model = build_hf_model("qwen2")
    hf = tmp_path / "hf"
    hf.mkdir()
    model.config.save_pretrained(hf)
    state = dict(model.state_dict())
    marker = tmp_path / "pwned"
    state["model.embed_tokens.weight"] = _Evil(marker)
    torch.save(state, hf / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refusing to load pickled objects"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    assert not marker.exists(), "the pickled payload was executed"
    _no_output(tmp_path / "out")
    # control: an unsafe load of the same file does run the payload, so the check above can fail
    torch.load(hf / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


def test_plain_bin_checkpoint_converts(tmp_path):
    model = build_hf_model("llama")
    hf = tmp_path / "hf"
    hf.mkdir()
    model.config.save_pretrained(hf)
    torch.save(model.state_dict(), hf / "pytorch_model.bin")
    meg = hf_to_megatron(hf, tmp_path / "meg", tp=2, pp=1, progress=False)
    back = megatron_to_hf(meg, tmp_path / "back", progress=False)
    shard = next(back.glob("*.safetensors"))
    result = load_file(shard)
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight":  # tied: not stored separately
            assert key not in result
            continue
        assert torch.equal(result[key], tensor), key


def test_pickled_object_in_dist_metadata_is_refused_not_run(qwen2_dirs, tmp_path):
    meg = _copy(qwen2_dirs[1], tmp_path / "meg")
    marker = tmp_path / "pwned"
    (meg / ".metadata").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(CheckpointError, match=r"\.metadata: refuses to unpickle builtins\.exec \(a checkpoint must hold data only\)$"):
        megatron_to_hf(meg, tmp_path / "out", progress=False)
    assert not marker.exists()
    _no_output(tmp_path / "out")


def test_truncated_shard_names_the_file(qwen2_dirs, tmp_path):
    hf = _copy(qwen2_dirs[0], tmp_path / "hf")
    victim = sorted(hf.glob("*.safetensors"))[2]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=rf"{victim.name}: tensor .* lies past the end of the file"):
        hf_to_megatron(hf, tmp_path / "out", progress=False)
    _no_output(tmp_path / "out")
