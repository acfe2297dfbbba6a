"""`python -m maspo_megatron.launch.sglang_server_args --config FILE [overrides]`: the SGLang server settings
of a training config as shell assignments, for slurm/train_disaggregated.sbatch and slurm/sglang_node.sh,
so servers started by Slurm run exactly what the yaml says (tp_size, dp_size, mem_fraction_static,
quantization, deterministic inference, memory saver, extra_args), as servers the trainer launches do.

Prints (shell-quoted, for `eval`):
    MASPO_SGLANG_TP=<tp_size * dp_size GPUs per server>   MASPO_SGLANG_ARGS=<launch_server flags>
    MASPO_FP8_BLOCK=<weight_sync.fp8_block_size, empty without weight_sync.fp8>   MASPO_FP8_TP=<tp_size>
Exit status 2 with a one-line error on a bad config.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from maspo_megatron.config import ConfigError, load_config


def server_settings(config_path: str, overrides: list[str]) -> dict[str, str]:
    from maspo_megatron.rollout.sglang.launcher import server_flags

    rollout = load_config(config_path, overrides).rollout
    sglang, sync = rollout.sglang, rollout.weight_sync
    return {"MASPO_SGLANG_TP": str(sglang.tp_size * sglang.dp_size), "MASPO_SGLANG_ARGS": shlex.join(server_flags(sglang)),
            "MASPO_FP8_BLOCK": str(sync.fp8_block_size) if sync.fp8 else "", "MASPO_FP8_TP": str(sglang.tp_size)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maspo_megatron.launch.sglang_server_args",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides of the training config")
    args = parser.parse_args(argv)
    try:
        settings = server_settings(args.config, args.overrides)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"sglang_server_args: {exc}", file=sys.stderr)
        return 2
    for key, value in settings.items():
        print(f"{key}={shlex.quote(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
