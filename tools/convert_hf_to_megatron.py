#!/usr/bin/env python
"""Hugging Face checkpoint -> Megatron dist checkpoint (torch_dist), streamed tensor by tensor.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir MEG --tp 2 --pp 2 [--dtype bf16]
    torchrun --nproc-per-node 4 tools/convert_hf_to_megatron.py ...   # the chunks are split across processes

The same as `python -m maspo_megatron convert-to-megatron` (maspo_megatron/checkpoint/convert_cli.py).
The result loads at any TP/PP (dist checkpoints reshard); --tp sets the vocab padding (multiple
of 128 x tp) and the chunking. MEG/hf_config/ keeps config + tokenizer files for the way back.
"""
from __future__ import annotations

import _conversion_cli  # noqa: F401  (the repo root on sys.path)

from maspo_megatron.checkpoint.convert_cli import to_megatron_main

if __name__ == "__main__":
    raise SystemExit(to_megatron_main())
