"""Entry point: `python -m maspo_megatron.train --config FILE [dotted.key=value ...]` (console: maspo-train).

Runs as one process, or one process per rank under torchrun / srun (rank, world size and
rendezvous from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and
MASTER_ADDR/MASTER_PORT). Exit codes: 0 done; 75 stopped by SIGUSR1/SIGTERM after writing a
checkpoint (requeue and run the same command again: it resumes from `latest`); 2 bad config or
setup value (one line on stderr, no traceback); anything else: a crash.
"""
from __future__ import annotations

import argparse
import os
import sys

from maspo_megatron.config import ConfigError, load_config
from maspo_megatron.utils.ports import free_port

EXIT_BAD_CONFIG = 2


def parse_args(argv=None, prog: str = "maspo-train"):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=False, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.maspo.alpha=0.5")
    return parser.parse_args(argv)


def main(argv=None, prog: str = "maspo-train") -> int:
    args = parse_args(argv, prog)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"maspo-train: config error: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from maspo_megatron.parallel.launch_env import rank_env  # imports torch: after the config is read

    if rank_env().world_size == 1 and "MASTER_PORT" not in os.environ:
        # A lone process rendezvouses with itself: any free port, so that two runs on one
        # machine do not collide on the default 29500.
        os.environ["MASTER_ADDR"] = os.environ.get("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(free_port())
    from maspo_megatron.trainer.loop import Trainer

    try:
        trainer = Trainer(cfg)
    except (ValueError, FileNotFoundError) as exc:  # setup problems that name their key/file
        print(f"maspo-train: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    code = trainer.run()
    from maspo_megatron.parallel import destroy_distributed

    destroy_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main())
