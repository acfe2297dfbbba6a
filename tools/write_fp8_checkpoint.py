#!/usr/bin/env python
"""Writes the block-FP8 HF checkpoint FP8 SGLang servers start from (rollout.weight_sync.fp8 runs).

    python tools/write_fp8_checkpoint.py --hf-dir /models/Llama-3.3-70B-Instruct \\
        --out-dir /models/Llama-3.3-70B-Instruct-fp8 --tp-size 8 [--block-size 128]

Linear weights become float8_e4m3fn + fp32 weight_scale_inv in [block, block] tiles (the layout the
weight sync sends: maspo_megatron/rollout/weight_sync/fp8.py); embeddings, lm_head, norms and biases
stay as they are; config.json gets the quantization_config. --tp-size is the servers' TP size
(rollout.sglang.tp_size): every TP shard must hold whole blocks. Exit status 2 with a one-line error
on bad input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maspo_megatron.rollout.weight_sync.fp8_checkpoint import write_fp8_checkpoint  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="BF16 HF checkpoint directory")
    parser.add_argument("--out-dir", required=True, help="new directory for the FP8 checkpoint")
    parser.add_argument("--tp-size", type=int, default=1, help="the servers' rollout.sglang.tp_size")
    parser.add_argument("--block-size", type=int, default=128, help="rollout.weight_sync.fp8_block_size")
    args = parser.parse_args(argv)
    if args.tp_size < 1 or args.block_size < 1:
        print("write_fp8_checkpoint: --tp-size and --block-size must be >= 1", file=sys.stderr)
        return 2
    try:
        counts = write_fp8_checkpoint(args.hf_dir, args.out_dir, (args.block_size, args.block_size), args.tp_size)
    except (OSError, ValueError) as exc:
        print(f"write_fp8_checkpoint: {exc}", file=sys.stderr)
        return 2
    print(f"write_fp8_checkpoint: {args.out_dir}: {counts['quantized']} linear weights in FP8, {counts['kept']} tensors "
          f"kept, {counts['bytes'] / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
