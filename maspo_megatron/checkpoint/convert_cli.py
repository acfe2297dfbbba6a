"""The two converter command lines, shared by `python -m maspo_megatron convert-to-{megatron,hf}` and
`tools/convert_{hf_to_megatron,megatron_to_hf}.py` (which stay as launchers: torchrun, SLURM scripts).

    python -m maspo_megatron convert-to-megatron --hf-dir HF --out-dir MEG --tp 2 --pp 2 [--dtype bf16]
    python -m maspo_megatron convert-to-hf --megatron-dir MEG --out-dir HF2 [--dtype bf16] [--max-shard-size 5GB]

Expected failures (bad files, configs, shapes) print one line `error: ...` and exit 2; Ctrl-C exits
130 (no output written). Conversion itself: `checkpoint/convert.py`.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Callable, Optional

TO_MEGATRON_HELP = "Hugging Face checkpoint -> Megatron dist checkpoint (torch_dist), streamed tensor by tensor"
TO_HF_HELP = "Megatron dist checkpoint (torch_dist, any TP/PP) -> Hugging Face safetensors shards"


def _run(body: Callable[[], None]) -> int:
    """body(); expected failures -> one line on stderr and exit code 2."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Megatron warns on import that TE/apex are missing: expected on CPU, noise for a converter
    warnings.filterwarnings("ignore", message="Transformer Engine and Apex are not installed")
    try:
        body()
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as exc:
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted (no output written)", file=sys.stderr)
        return 130
    return 0


def to_megatron_main(argv: Optional[list] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=TO_MEGATRON_HELP + ". The result loads at any TP/PP; "
                                     "--tp sets the vocab padding and the chunking; torchrun splits the chunks "
                                     "across processes. OUT/hf_config/ keeps config + tokenizer for the way back.")
    parser.add_argument("--hf-dir", required=True, help="HF model dir (config.json + safetensors or .bin shards)")
    parser.add_argument("--out-dir", required=True, help="new directory for the Megatron checkpoint (must not exist)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size the checkpoint is laid out for")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size (validated against the layer count)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    parser.add_argument("--vocab-divisible-by", type=int, default=128, help="vocab padded to a multiple of this x tp")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    def body() -> None:
        if args.tp < 1 or args.pp < 1:
            raise ValueError(f"--tp/--pp: must be >= 1 (got tp={args.tp}, pp={args.pp})")
        from maspo_megatron.checkpoint.convert import hf_to_megatron

        out = hf_to_megatron(args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, dtype=args.dtype,
                             vocab_divisible_by=args.vocab_divisible_by, progress=not args.quiet)
        if not args.quiet:
            print(f"wrote {out}")

    return _run(body)


def to_hf_main(argv: Optional[list] = None, prog: Optional[str] = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=TO_HF_HELP + ": model-0000k-of-0000n.safetensors + "
                                     "index, config, generation config and tokenizer files; vocab padding removed; "
                                     "one layer in memory at a time.")
    parser.add_argument("--megatron-dir", required=True, help="Megatron torch_dist checkpoint dir (has metadata.json)")
    parser.add_argument("--out-dir", required=True, help="new directory for the HF checkpoint (must not exist)")
    parser.add_argument("--hf-config-dir", default=None, help="dir with config.json (+ tokenizer); default MEG/hf_config "
                        "(needed for a trainer checkpoint)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    def body() -> None:
        from maspo_megatron.checkpoint.convert import megatron_to_hf
        from maspo_megatron.checkpoint.hf_writer import parse_size

        out = megatron_to_hf(args.megatron_dir, args.out_dir, hf_config_dir=args.hf_config_dir, dtype=args.dtype,
                             max_shard_bytes=parse_size(args.max_shard_size), progress=not args.quiet)
        if not args.quiet:
            print(f"wrote {out}")

    return _run(body)
