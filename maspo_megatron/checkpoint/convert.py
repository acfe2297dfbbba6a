"""Checkpoint conversion HF <-> Megatron dist checkpoint (torch_dist), tensor by tensor.

Tensor bytes move file to file inside the kernel (`byte_copy`: copy_file_range, else sendfile)
whenever a tensor is only renamed, re-chunked, row-interleaved (qkv per query group, gate/up) or
vocab-padded/trimmed, so they never enter this process. What cannot be expressed as row runs (a
dtype cast, `.bin` sources, TP chunks split along dim 1) goes through memory, one full tensor
(HF -> Megatron) or one layer's tensor (Megatron -> HF) at a time. Both write into a hidden
temporary directory next to the output and rename it into place only when everything succeeded
(no partial output on error). The tools/ scripts are thin CLIs over `hf_to_megatron` /
`megatron_to_hf`.

Megatron dir layout written here: the torch_dist checkpoint (`metadata.json`, `common.pt`,
`.metadata`, `__<rank>_0.distcp`), plus `hf_config/` (the source config, generation config and
tokenizer files, for the way back) and `maspo_conversion.json` (what was converted, how).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist

from maspo_megatron.checkpoint.byte_copy import RowMap, SegmentCopier, SpliceTarget, slice_rows
from maspo_megatron.checkpoint.convert_tensors import (
    build_full,
    chunking,
    fragment_rows,
    hf_row_map,
    row_bytes,
    write_qkv,
    write_spliced,
)
from maspo_megatron.checkpoint.dist_read import DistCheckpointReader
from maspo_megatron.checkpoint.dist_save import extra_state_object, meta_sharded_tensor, save_lazy
from maspo_megatron.checkpoint.errors import CheckpointError
from maspo_megatron.checkpoint.hf_reader import HFCheckpointReader
from maspo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter
from maspo_megatron.models.families import FAMILIES
from maspo_megatron.models.meta import load_hf_config_dict, model_meta
from maspo_megatron.models.weight_map import MegatronTensor, WeightMap
from maspo_megatron.parallel.launch_env import rank_env

HF_CONFIG_SUBDIR = "hf_config"
CONVERSION_FILE = "maspo_conversion.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype choices
# per-layer modules that keep an `_extra_state` (FP8 metadata under Transformer Engine; None here)
EXTRA_STATE_KEYS = (
    "decoder.layers.self_attention.linear_qkv._extra_state",
    "decoder.layers.self_attention.linear_proj._extra_state",
    "decoder.layers.self_attention.core_attention._extra_state",
    "decoder.layers.mlp.linear_fc1._extra_state",
    "decoder.layers.mlp.linear_fc2._extra_state",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".distcp")


class Progress:
    """One line per ~5% of bytes on stderr (rank 0 only): done/total, GB/s."""

    def __init__(self, label: str, total_bytes: int, enabled: bool):
        self.label, self.total, self.enabled = label, max(total_bytes, 1), enabled
        self.done, self.start, self._next = 0, time.perf_counter(), 0.05

    def add(self, nbytes: int) -> None:
        self.done += nbytes
        if self.enabled and self.done / self.total >= self._next:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"[{self.label}] {100 * self.done / self.total:5.1f}%  {self.done / 1e9:.2f}/{self.total / 1e9:.2f} GB"
                  f"  {self.done / 1e9 / elapsed:.2f} GB/s", file=sys.stderr, flush=True)
            self._next = self.done / self.total + 0.05


def ensure_process_group() -> bool:
    """Initialises torch.distributed (gloo) if needed: from torchrun/srun env, else a 1-process group.
    Returns True when this call created it (the caller then destroys it)."""
    if dist.is_initialized():
        return False
    if rank_env().launcher == "torchrun":  # env:// rendezvous; srun without torchrun converts alone
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return True


@contextlib.contextmanager
def _conversion_scope(tmp: Path, created_group: bool):
    """On any error the hidden partial output goes; the process group this call created always does."""
    try:
        yield
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if created_group:
            dist.destroy_process_group()


def _prepare_out_dir(out_dir: Path) -> Path:
    if out_dir.exists():
        raise CheckpointError(f"{out_dir}: output directory already exists (choose a new one)")
    if not out_dir.parent.is_dir():
        raise CheckpointError(f"{out_dir.parent}: parent of the output directory does not exist")
    return out_dir.parent / f".{out_dir.name}.partial"


def _copy_side_files(src: Path, dst: Path, dtype: Optional[str]) -> None:
    """config.json, generation config, tokenizer and template files (everything but weights)."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.endswith(_WEIGHT_SUFFIXES) and not path.name.endswith(".index.json"):
            shutil.copy2(path, dst / path.name)
    if dtype is not None and (dst / "config.json").is_file():
        cfg = json.loads((dst / "config.json").read_text())
        name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
        cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] = name
        (dst / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check_hf_tensors(reader: HFCheckpointReader, wmap: WeightMap) -> dict[str, torch.dtype]:
    """Every tensor the table needs exists with the config's shape, and no tensor is left
    unexplained (a config that does not match its weights); returns their dtypes."""
    expected = set(wmap.hf_tensor_names())
    ignorable = {"lm_head.weight"} if wmap.meta.tied_embeddings else set()
    unexpected = sorted(n for n in reader.weight_map if n not in expected and n not in ignorable
                        and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise CheckpointError(f"{unexpected[0]}: tensor in {reader.file_of(unexpected[0])} has no {wmap.family.name} "
                              f"mapping rule for this config ({len(unexpected)} such tensors)")
    dtypes = {}
    for mt in wmap.megatron_tensors():
        names = [n.format(i=mt.layer) for n in mt.rule.hf]
        for name, shape in zip(names, wmap.hf_shapes(mt.rule), strict=True):
            if name not in reader.weight_map:
                raise CheckpointError(f"{name}: tensor missing from {reader.dir} (needed for {mt.name})")
            found, dtype = reader.shape_dtype(name)
            if found != shape:
                raise CheckpointError(f"{name}: shape {found} in {reader.file_of(name)}, expected {shape} from config.json")
            dtypes[name] = dtype
    return dtypes


def hf_to_megatron(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, tp: int = 1, pp: int = 1,
    dtype: Optional[str] = None, vocab_divisible_by: int = 128, progress: bool = True,
) -> Path:
    """Converts an HF checkpoint dir into a Megatron torch_dist checkpoint for TP=tp, PP=pp.

    The checkpoint loads at any other TP/PP too (dist checkpoints reshard on load); tp sets the
    vocab padding (multiple of vocab_divisible_by x tp) and the chunking, pp is validated.
    Under torchrun/srun the chunks are divided among the processes. Collective over the default
    process group when one exists: every rank must call it.
    """
    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.models.config_builder import check_parallel_fit

    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    created = ensure_process_group()
    rank, world = dist.get_rank(), dist.get_world_size()
    tmp = _prepare_out_dir(out_dir)
    with _conversion_scope(tmp, created):
        cfg = load_hf_config_dict(hf_dir)
        meta = model_meta(cfg, tp=tp, vocab_divisible_by=vocab_divisible_by)
        check_parallel_fit(meta, ParallelConfig(tp=tp, pp=pp))
        wmap = WeightMap(FAMILIES[meta.family], meta)
        reader = HFCheckpointReader(hf_dir)
        src_dtypes = check_hf_tensors(reader, wmap)
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier()
        state, producers, total = {}, {}, 0
        layers_per_stage = meta.num_layers // pp
        cache: dict[str, torch.Tensor] = {}

        def full_of(mt: MegatronTensor) -> torch.Tensor:
            if mt.name not in cache:
                cache.clear()  # keep one full tensor alive at a time
                cache[mt.name] = build_full(mt, wmap, reader, src_dtypes)
            return cache[mt.name]

        # chunks whose bytes are runs of HF file bytes are copied file to file by the kernel: DCP
        # gets a view of one never-touched allocation and the output stream copies the runs
        splice = SpliceTarget(SegmentCopier())
        placeholder: list[torch.Tensor] = []

        def make_producer(mt: MegatronTensor, piece: int, pieces: int, rows: Optional[RowMap], chunk_shape: tuple,
                          dtype: torch.dtype) -> Callable[[], torch.Tensor]:
            span = fragment_rows(mt, piece, pieces)

            def produce() -> torch.Tensor:
                if rows is not None and span is not None:
                    segments = slice_rows(rows, *span, row_bytes(mt.shape, dtype))
                    nbytes = sum(seg.nbytes for seg in segments)
                    chunk = placeholder[0][:nbytes].view(dtype).view(chunk_shape)
                    if nbytes:  # torch.save writes nothing for an empty tensor
                        splice.expect(chunk.data_ptr(), segments, f"{mt.name} chunk {piece}")
                    return chunk
                full = full_of(mt)
                return full if mt.rule.tp_dim is None else torch.chunk(full, pieces, dim=mt.rule.tp_dim)[piece]
            return produce

        spliced_bytes = 0
        for mt in wmap.megatron_tensors():
            stage = 0 if mt.name.startswith("embedding.") else (pp - 1 if mt.layer is None else mt.layer // layers_per_stage)
            target = DTYPES[dtype] if dtype else src_dtypes[mt.rule.hf[0].format(i=mt.layer)]
            ch = chunking(mt, wmap, tp)
            rows = None
            for j, (offsets, tp_rank) in enumerate(zip(ch.rank_offsets, ch.tp_ranks, strict=True)):
                if (stage * tp + tp_rank) % world != rank:
                    continue
                if rows is None:
                    rows = hf_row_map(mt, wmap, reader, target)
                sh = meta_sharded_tensor(ch.key, ch.chunk_shape, target, *offsets, prepend_axis_num=ch.prepend)
                state[f"{mt.name}#{j}"] = sh
                producers[(ch.key, tuple(sh.global_offset))] = make_producer(mt, j, len(ch.rank_offsets), rows, ch.chunk_shape, target)
                nbytes = sh.data.numel() * sh.data.element_size()
                total += nbytes
                if rows is not None and fragment_rows(mt, j, len(ch.rank_offsets)) is not None:
                    spliced_bytes = max(spliced_bytes, nbytes)
            if mt.layer is not None and mt.rule.megatron == "self_attention.linear_qkv.weight" and (stage * tp) % world == rank:
                for key in EXTRA_STATE_KEYS:
                    state[f"{key}#{mt.layer}"] = extra_state_object(key, mt.layer, meta.num_layers)
        meter = Progress("hf->megatron", total, progress and rank == 0)
        # virtual only: its pages are never touched (the kernel copies the bytes), so never resident
        placeholder.append(torch.empty(spliced_bytes, dtype=torch.uint8))
        try:
            save_lazy(state, producers, tmp, on_write=meter.add, splice=splice)
        finally:
            splice.copier.close()
        reader.close()
        if rank == 0:
            _copy_side_files(hf_dir, tmp / HF_CONFIG_SUBDIR, dtype)
            record = {"source": str(hf_dir), "family": meta.family, "tp": tp, "pp": pp, "dtype": dtype,
                      "vocab_size": meta.vocab_size, "padded_vocab_size": meta.padded_vocab_size, "world_size": world}
            (tmp / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
            os.replace(tmp, out_dir)
        dist.barrier()
        return out_dir


def _check_megatron_tensors(reader: DistCheckpointReader, wmap: WeightMap) -> None:
    """Every model tensor exists with the config's shape; no model tensor is left unexplained."""
    expected = {mt.ckpt_key for mt in wmap.megatron_tensors()}
    unexpected = sorted(k for k in reader.tensors if k.startswith(("decoder.", "embedding.", "output_layer.")) and k not in expected)
    if unexpected:
        raise CheckpointError(f"{unexpected[0]}: tensor in {reader.dir} has no {wmap.family.name} mapping rule "
                              f"for the config used ({len(unexpected)} such tensors); wrong --hf-config-dir?")
    for mt in wmap.megatron_tensors():
        if mt.ckpt_key not in reader.tensors:
            raise CheckpointError(f"{mt.ckpt_key}: tensor missing from {reader.dir} (needed for {mt.name})")
        found = reader.global_shape(mt.ckpt_key)
        expected = mt.shape if mt.layer is None else (wmap.meta.num_layers, *mt.shape)
        vocab = mt.rule.layout == "vocab"
        ok = (found[1:] == expected[1:] and found[0] >= wmap.meta.vocab_size) if vocab else found == expected
        if not ok:
            raise CheckpointError(f"{mt.ckpt_key}: shape {found} in {reader.dir}, expected {expected} from config.json")


def megatron_to_hf(
    megatron_dir: str | os.PathLike, out_dir: str | os.PathLike, hf_config_dir: Optional[str | os.PathLike] = None,
    dtype: Optional[str] = None, max_shard_bytes: int = 5 * 10**9, progress: bool = True,
    split_across_ranks: Optional[bool] = None,
) -> Path:
    """Converts a Megatron torch_dist checkpoint (any TP/PP it was saved at) into HF safetensors shards.

    split_across_ranks: divide the output shards among all processes of the default group (each
    reads only the tensors of its shards; rank 0 writes the index and renames the result); every
    rank must call. Default: True when this call starts torch.distributed itself (the CLI under
    torchrun/srun), False when the caller already runs it (e.g. the trainer's driver alone calls
    this: then it is local to the calling process, no collectives).
    """
    megatron_dir, out_dir = Path(megatron_dir), Path(out_dir)
    cfg_dir = Path(hf_config_dir) if hf_config_dir else megatron_dir / HF_CONFIG_SUBDIR
    if not (cfg_dir / "config.json").is_file():
        raise CheckpointError(f"{cfg_dir / 'config.json'}: missing; pass --hf-config-dir with the model's config.json")
    created = ensure_process_group()
    split = created if split_across_ranks is None else split_across_ranks
    rank, world = (dist.get_rank(), dist.get_world_size()) if split else (0, 1)
    tmp = _prepare_out_dir(out_dir)
    with _conversion_scope(tmp, created):
        wmap = WeightMap.from_hf_config(cfg_dir)
        reader = DistCheckpointReader(megatron_dir)
        _check_megatron_tensors(reader, wmap)
        tensors = list(wmap.megatron_tensors())
        entries = []
        for mt in tensors:
            out_dtype = DTYPES[dtype] if dtype else reader.dtype(mt.ckpt_key)
            names = [n.format(i=mt.layer) for n in mt.rule.hf]
            entries += [(n, shape, out_dtype) for n, shape in zip(names, wmap.hf_shapes(mt.rule), strict=True)]
        if rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        if split:
            dist.barrier()
        count = len(ShardedSafetensorsWriter(tmp, entries, max_shard_bytes).shard_names)
        writer = ShardedSafetensorsWriter(tmp, entries, max_shard_bytes, owned_shards={k for k in range(count) if k % world == rank})
        mine = [mt for mt in tensors if any(writer.wants(n.format(i=mt.layer)) for n in mt.rule.hf)]
        total = sum(torch.Size(t.shape).numel() * reader.dtype(t.ckpt_key).itemsize for t in mine)
        meter = Progress("megatron->hf", total, progress and rank == 0)
        failed = torch.zeros(1)
        try:
            for mt in mine:  # one tensor (one layer's slice of a stacked tensor) at a time
                if mt.rule.layout not in ("copy", "vocab", "qkv", "gate_up") \
                        or not write_spliced(mt, wmap, reader, writer, DTYPES[dtype] if dtype else None):
                    (full,) = reader.load([(mt.ckpt_key, mt.layer)])
                    if mt.rule.layout == "qkv":
                        write_qkv(mt, wmap, full, writer)
                    else:
                        for hf_name, tensor in wmap.megatron_to_hf(mt.name, full):
                            writer.add(hf_name, tensor)
                    del full
                meter.add(torch.Size(mt.shape).numel() * reader.dtype(mt.ckpt_key).itemsize)
            writer.finish()
        except BaseException:
            failed.fill_(1)
            raise
        finally:
            writer.abort()
            if split:  # every rank learns whether any failed (instead of waiting at a barrier forever)
                dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise CheckpointError(f"{out_dir}: another process failed while converting (see its error)")
        if rank == 0:
            writer.write_index()
            _copy_side_files(cfg_dir, tmp, dtype)
            os.replace(tmp, out_dir)
        if split:
            dist.barrier()
        return out_dir
