#!/usr/bin/env python
"""Hugging Face checkpoint -> Megatron dist checkpoint (torch_dist), streamed tensor by tensor.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir MEG --tp 2 --pp 2 [--dtype bf16]
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py ...   # the chunks are split across processes

The result loads at any TP/PP (dist checkpoints reshard); --tp sets the vocab padding (multiple
of 128 x tp) and the chunking. MEG/hf_config/ keeps config + tokenizer files for the way back.
"""
from __future__ import annotations

import argparse

from _conversion_cli import run_cli


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="HF model dir (config.json + safetensors or .bin shards)")
    parser.add_argument("--out-dir", required=True, help="new directory for the Megatron checkpoint (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is laid out for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (validated against the layer count)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="vocab padded to a multiple of this x tp")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tp < 1 or args.pp < 1:
        raise ValueError(f"--tp/--pp: must be >= 1 (got tp={args.tp}, pp={args.pp})")
    from maspo_megatron.models.convert import hf_to_megatron

    out = hf_to_megatron(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                         vocab_divisible_by=args.vocab_divisible_by, progress=not args.quiet)
    if not args.quiet:
        print(f"wrote {out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
