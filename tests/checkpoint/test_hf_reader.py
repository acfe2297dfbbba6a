"""The reader's slice reads (hf_reader) and the sliced loader's errors, in one process (no Megatron)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
from maspo_megatron.checkpoint.hf_weights import read_shard
from maspo_megatron.models import WeightMap
from tests.helpers.hf_models import hf_config, save_hf_model


@pytest.fixture()
def one_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(6, 10, generator=gen).to(torch.bfloat16), "b": torch.randn(7, generator=gen)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_column_slices_read_only_their_bytes(one_file):
    path, tensors = one_file
    reader = HFCheckpointReader(path)
    same = torch.empty(6, 4, dtype=torch.bfloat16)
    reader.read_columns_into("w", same, 3)
    assert torch.equal(same, tensors["w"][:, 3:7])
    assert reader.bytes_read == 6 * 4 * 2
    cast = torch.empty(6, 5, dtype=torch.float32)  # a parameter in another dtype: through a slice-sized buffer
    reader.read_columns_into("w", cast, 5)
    assert torch.equal(cast, tensors["w"][:, 5:].float())
    assert reader.bytes_read == 6 * 4 * 2 + 6 * 5 * 2
    rows = torch.empty(3, dtype=torch.float64)
    reader.read_rows_into("b", rows, row_start=2)
    assert torch.equal(rows, tensors["b"][2:5].double())
    assert reader.bytes_read == 6 * 4 * 2 + 6 * 5 * 2 + 3 * 4


def test_column_slice_past_the_end_is_an_error_naming_the_tensor(one_file):
    path, _ = one_file
    with pytest.raises(ValueError, match=r"model.safetensors: tensor w \(6, 10\).*cannot fill columns 8"):
        HFCheckpointReader(path).read_columns_into("w", torch.empty(6, 4, dtype=torch.bfloat16), 8)


def test_sliced_load_names_a_tensor_the_config_does_not_explain(tmp_path):
    save_hf_model("qwen2", tmp_path / "hf")
    config = hf_config("qwen2")
    config.intermediate_size = 128  # the checkpoint has 96
    wmap = WeightMap.from_hf_config(config, tp=2)
    rule, layer = wmap.resolve("decoder.layers.0.mlp.linear_fc1.weight")
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight: shape \(96, 64\) in .*safetensors, "
                                         r"expected \(128, 64\) from the config"):
        read_shard(HFCheckpointReader(tmp_path / "hf"), wmap, rule, layer, torch.empty(128, 64), 0, 2)
