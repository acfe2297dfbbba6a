#!/usr/bin/env python
"""Megatron dist checkpoint (torch_dist, any TP/PP) -> Hugging Face safetensors shards.

    python tools/convert_megatron_to_hf.py --megatron-dir MEG --out-dir HF2 [--dtype bf16] [--max-shard-size 5GB]
        [--hf-config-dir HF]    # config/tokenizer source when MEG has no hf_config/ (e.g. a trainer checkpoint)

Writes model-0000k-of-0000n.safetensors + model.safetensors.index.json, config.json, generation
config and tokenizer files; vocab padding removed. Reads one layer at a time.
"""
from __future__ import annotations

import argparse

from _conversion_cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megatron-dir", required=True, help="Megatron torch_dist checkpoint dir (has metadata.json)")
    parser.add_argument("--out-dir", required=True, help="new directory for the HF checkpoint (must not exist)")
    parser.add_argument("--hf-config-dir", default=None, help="dir with config.json (+ tokenizer); default MEG/hf_config")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    from maspo_megatron.models.convert import megatron_to_hf
    from maspo_megatron.models.hf_io import parse_size

    out = megatron_to_hf(args.megatron_dir, args.out_dir, hf_config_dir=args.hf_config_dir, dtype=args.dtype,
                         max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
