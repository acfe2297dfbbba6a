"""The converters' copy-free paths agree with the reference transforms and readers they replace:
HF tensors read straight into the fused Megatron tensor == `WeightMap.hf_to_megatron`; dist
checkpoint slices read straight from the chunk files == DCP's own reader (TP-split chunks, strided
destinations, chunks spanning several layers); row-block writes are checked like whole tensors."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from maspo_megatron.checkpoint.convert import check_hf_tensors, ensure_process_group, hf_to_megatron
from maspo_megatron.checkpoint.convert_tensors import build_full
from maspo_megatron.checkpoint.dist_read import DistCheckpointReader, read_direct
from maspo_megatron.checkpoint.dist_save import meta_sharded_tensor, save_lazy
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
from maspo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter
from maspo_megatron.models import WeightMap
from tests.helpers.hf_models import VARIANTS, save_hf_model


@pytest.fixture
def process_group():
    created = ensure_process_group()
    yield
    if created:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_direct_build_equals_table_transform(name, tmp_path):
    save_hf_model(name, tmp_path / "hf")
    for tp in (1, 2):
        wmap = WeightMap.from_hf_config(tmp_path / "hf", tp=tp)  # tp changes the vocab padding
        reader = HFCheckpointReader(tmp_path / "hf")
        dtypes = check_hf_tensors(reader, wmap)
        for mt in wmap.megatron_tensors():
            direct = build_full(mt, wmap, reader, dtypes)
            reference = wmap.hf_to_megatron(mt.name, reader.get)
            assert direct.dtype == reference.dtype and torch.equal(direct, reference), (name, tp, mt.name)


def test_direct_reader_equals_dcp_reader_on_tp2_chunks(tmp_path, process_group):
    save_hf_model("qwen2", tmp_path / "hf")
    hf_to_megatron(tmp_path / "hf", tmp_path / "meg", tp=2, pp=2, progress=False)
    reader = DistCheckpointReader(tmp_path / "meg")
    strided = 0
    for key in reader.tensors:
        layers = [None] if not key.startswith("decoder.layers.") else range(reader.global_shape(key)[0])
        for layer in layers:
            direct = read_direct(reader, key, layer)
            assert direct is not None, key
            (reference,) = reader._load_dcp([(key, layer)])
            assert torch.equal(direct, reference), (key, layer)
        chunks = reader.tensors[key].chunks
        strided += any(c.sizes[-1] != reader.global_shape(key)[-1] for c in chunks)
    assert strided > 0  # TP-split along the last dim (linear_proj, fc2): the bounce-buffer path ran


def test_chunk_spanning_layers_falls_back_to_dcp(tmp_path, process_group):
    full = torch.arange(3 * 4 * 6, dtype=torch.float32).reshape(3, 4, 6)
    # one chunk holds all 3 layers (a stacked tensor saved without a per-layer axis)
    state = {"w": meta_sharded_tensor("decoder.layers.w", (3, 4, 6), torch.float32)}
    (tmp_path / "ckpt").mkdir()
    save_lazy(state, {("decoder.layers.w", (0, 0, 0)): lambda: full.clone()}, tmp_path / "ckpt")
    reader = DistCheckpointReader(tmp_path / "ckpt")
    assert read_direct(reader, "decoder.layers.w", 1) is None
    assert torch.equal(reader.load([("decoder.layers.w", 1)])[0], full[1])
    whole, layer2 = reader.load([("decoder.layers.w", None), ("decoder.layers.w", 2)])
    assert torch.equal(whole, full) and torch.equal(layer2, full[2])


def test_row_block_write_checks_shape(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [("a", (4, 3), torch.float32)], max_shard_bytes=10**6)
    with pytest.raises(CheckpointError, match="a: shape"):
        writer.add_parts("a", [torch.zeros(2, 3), torch.zeros(1, 3)])
    with pytest.raises(CheckpointError, match="a: shape"):
        writer.add_parts("a", [torch.zeros(2, 3), torch.zeros(2, 2)])
    writer.add_parts("a", [torch.ones(2, 3), torch.full((2, 3), 2.0)])
    writer.finish()
    writer.write_index()
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / writer.shard_names[0])["a"]
    assert torch.equal(loaded, torch.cat([torch.ones(2, 3), torch.full((2, 3), 2.0)]))
