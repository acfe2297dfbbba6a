"""The block-FP8 HF checkpoint FP8 SGLang servers start from, and the TP-sharding check it needs.

An FP8 rollout syncs blockwise-FP8 `weight` + `weight_scale_inv` (fp8.py) into servers started with
`--quantization fp8`; those servers must START from a checkpoint in that same layout (a BF16 directory
would be quantized online by SGLang into a different, per-tensor layout that the synced tensors do not
match). `write_fp8_checkpoint` writes it from the BF16 HF directory the run starts from:
    config.json      + quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [b, b], ...}
    *.safetensors    linear weights as float8_e4m3fn + fp32 weight_scale_inv; everything else unchanged
    tokenizer / generation files copied
`check_tp_blocks`: SGLang shards a block-FP8 weight by TP along its output dim (q/k/v/gate/up) or input
dim (o/down); each shard must hold whole 128-blocks, or loading the scales fails on the GPU.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import List, Mapping, Sequence, Tuple

from maspo_megatron.rollout.weight_sync.fp8 import DEFAULT_BLOCK, fp8_stream, quantization_config

# HF linear names by the dim SGLang's TP splits (column-parallel: rows; row-parallel: columns)
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
_COPIED = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
           "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")


def check_tp_blocks(shapes: Mapping[str, Sequence[int]], tp_size: int, block: Tuple[int, int] = DEFAULT_BLOCK) -> List[str]:
    """Problems (empty when fine) with `shapes` {HF name: [N, K]} of the linear weights sharded over `tp_size`."""
    problems = []
    for name, (rows, cols) in sorted(shapes.items()):
        if any(f".{p}." in name for p in COLUMN_PARALLEL):
            size, edge, what = rows, block[0], "rows"
        elif any(f".{p}." in name for p in ROW_PARALLEL):
            size, edge, what = cols, block[1], "columns"
        else:
            continue
        if size % tp_size or (size // tp_size) % edge:
            problems.append(f"{name} [{rows}, {cols}]: {size} {what} over tp_size {tp_size} = {size / tp_size:g} per "
                            f"shard, not a multiple of the FP8 block {edge}")
    return problems


def linear_shapes(meta) -> dict:
    """{HF name: [N, K]} of layer 0's linear weights of a `ModelMeta` (every layer has the same shapes)."""
    q_rows, kv_rows = meta.num_heads * meta.head_dim, meta.num_kv_heads * meta.head_dim
    prefix = "model.layers.0."
    return {prefix + "self_attn.q_proj.weight": [q_rows, meta.hidden_size],
            prefix + "self_attn.k_proj.weight": [kv_rows, meta.hidden_size],
            prefix + "self_attn.v_proj.weight": [kv_rows, meta.hidden_size],
            prefix + "self_attn.o_proj.weight": [meta.hidden_size, q_rows],
            prefix + "mlp.gate_proj.weight": [meta.ffn_hidden_size, meta.hidden_size],
            prefix + "mlp.up_proj.weight": [meta.ffn_hidden_size, meta.hidden_size],
            prefix + "mlp.down_proj.weight": [meta.hidden_size, meta.ffn_hidden_size]}


def _shards(src: Path) -> List[Path]:
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{src}: no *.safetensors (expected a HF checkpoint directory)")
    return files


def write_fp8_checkpoint(src_dir: str, out_dir: str, block: Tuple[int, int] = DEFAULT_BLOCK,
                         tp_size: int = 1) -> dict:
    """BF16 HF dir -> block-FP8 HF dir (one output shard per input shard, one tensor in memory at a time
    plus that shard). Refuses an existing `out_dir` and shapes whose TP shards split FP8 blocks.
    Returns {"quantized": n, "kept": m, "bytes": total}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, out = Path(src_dir), Path(out_dir)
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src}/config.json already has a quantization_config: expected the BF16 checkpoint")
    if out.exists():
        raise FileExistsError(f"{out} already exists: choose a new output directory")
    shapes = {}
    for shard in _shards(src):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                shape = handle.get_slice(name).get_shape()
                if len(shape) == 2:
                    shapes[name] = shape
    problems = check_tp_blocks(shapes, tp_size, block)
    if problems:
        raise ValueError(f"rollout.sglang.tp_size {tp_size} splits FP8 blocks ({len(problems)} weights): " + problems[0])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {"quantized": 0, "kept": 0, "bytes": 0}
    weight_map = {}
    for shard in _shards(src):
        with safe_open(str(shard), framework="pt") as handle:
            items = ((name, handle.get_tensor(name), None) for name in handle.keys())
            tensors = {name: tensor.contiguous() for name, tensor, _ in fp8_stream(items, block=block)}
        scales = sum(1 for name in tensors if name.endswith(".weight_scale_inv"))
        counts["quantized"] += scales
        counts["kept"] += len(tensors) - 2 * scales
        counts["bytes"] += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({name: shard.name for name in tensors})
        save_file(tensors, str(tmp / shard.name), metadata={"format": "pt"})
        del tensors
    config["quantization_config"] = quantization_config(block)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": counts["bytes"]}, "weight_map": dict(sorted(weight_map.items()))}, indent=1))
    for name in _COPIED:
        if (src / name).exists():
            shutil.copy2(src / name, tmp / name)
    tmp.rename(out)
    return counts
