#!/usr/bin/env python
"""Megatron dist checkpoint (torch_dist, any TP/PP) -> Hugging Face safetensors shards.

    python tools/convert_megatron_to_hf.py --megatron-dir MEG --out-dir HF2 [--dtype bf16] [--max-shard-size 5GB]
        [--hf-config-dir HF]    # config/tokenizer source when MEG has no hf_config/ (e.g. a trainer checkpoint)

The same as `python -m maspo_megatron convert-to-hf` (maspo_megatron/checkpoint/convert_cli.py).
Writes model-0000k-of-0000n.safetensors + model.safetensors.index.json, config.json, generation
config and tokenizer files; vocab padding removed. Reads one layer at a time.
"""
from __future__ import annotations

import _conversion_cli  # noqa: F401  (the repo root on sys.path)

from maspo_megatron.checkpoint.convert_cli import to_hf_main

if __name__ == "__main__":
    raise SystemExit(to_hf_main())
