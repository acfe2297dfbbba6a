"""One supervised warm-up, shared by every method of a seed: warm up, evaluate, export a HF checkpoint.

    python tools/_experiments_warmup.py --config BASE.yaml --out DIR [dotted.key=value ...]

Builds the trainer exactly as `maspo_megatron.train` does (so `trainer.sft_warmup_steps` runs in
its constructor), evaluates the warmed-up policy on the validation sets (the step-0 reference of
the report), and writes the engine's weights as a HF checkpoint to DIR/hf. RL runs then start
from it with `model.init_from_hf=DIR/hf trainer.sft_warmup_steps=0`. Files written:
DIR/hf/ (config.json, model.safetensors, tokenizer) and DIR/warmup_eval.json (written last, so
its presence marks a finished warm-up). Run it as its own process: it initialises torch.distributed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EVAL_FILE = "warmup_eval.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True, help="warm-up directory (hf/ and warmup_eval.json go here)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from maspo_megatron.config import ConfigError, load_config

    out = Path(args.out)
    overrides = list(args.overrides) + [f"trainer.output_dir={out / 'trainer'}", "trainer.resume=false"]
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"warm-up: config error: {exc}", file=sys.stderr)
        return 2
    if cfg.trainer.sft_warmup_steps < 1:
        print("warm-up: trainer.sft_warmup_steps must be >= 1 for a warm-up run", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from maspo_megatron.parallel import destroy_distributed
    from maspo_megatron.trainer.loop import Trainer

    trainer = Trainer(cfg)  # runs the supervised warm-up and syncs the engine
    try:
        evaluation = trainer.evaluate()
        trainer.export_hf(out / "hf")
    finally:
        trainer.close()
        destroy_distributed()
    (out / EVAL_FILE).write_text(json.dumps({"step": 0, "sft_warmup_steps": cfg.trainer.sft_warmup_steps,
                                             **evaluation}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
