"""`python -m maspo_megatron.launch`: run one training config through nemo-run, locally or on Slurm.

    python -m maspo_megatron.launch --config examples/qwen2.5_7b.yaml --executor slurm --nodes 2 \\
        --gpus-per-node 8 --partition batch --account proj --time 04:00:00 \\
        --container-image nvcr.io/nvidia/pytorch:25.04-py3 trainer.total_steps=500
    python -m maspo_megatron.launch --config examples/cpu_tiny.yaml --device cpu --tasks-per-node 2

Positional `key=value` arguments override the TRAINING config; `--set key=value` overrides the
launch settings (LaunchConfig fields, also loadable from `--launch FILE`). Exit status: 0 when the
job succeeded (or was submitted, with --detach), 1 when it ended in another state, 2 on bad input.
"""
from __future__ import annotations

import argparse
import sys

from maspo_megatron.config import ConfigError, load_config
from maspo_megatron.launch.cluster import LaunchConfig

# CLI flag -> LaunchConfig field, for the settings people change on every launch.
_FLAGS = {"executor": str, "device": str, "nodes": int, "gpus_per_node": int, "tasks_per_node": int,
          "partition": str, "account": str, "time": str, "container_image": str, "job_dir": str}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m maspo_megatron.launch", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--launch", help="LaunchConfig YAML (executor, cluster shape, container, ...)")
    for field, kind in _FLAGS.items():
        parser.add_argument("--" + field.replace("_", "-"), dest=field, type=kind, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="launch-config override")
    parser.add_argument("--name", default="maspo", help="nemo-run experiment name")
    parser.add_argument("--dry-run", action="store_true", help="print the job nemo-run would submit")
    parser.add_argument("--detach", action="store_true", help="return after submission (Slurm)")
    parser.add_argument("overrides", nargs="*", help="training-config overrides, e.g. trainer.total_steps=10")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    launch_overrides = [f"{field}={getattr(args, field)}" for field in _FLAGS if getattr(args, field) is not None]
    try:
        cfg = load_config(args.config, args.overrides)
        launch = load_config(args.launch, launch_overrides + list(args.set), cls=LaunchConfig)
    except ConfigError as exc:
        print(f"maspo launch: config error: {exc}", file=sys.stderr)
        return 2
    from maspo_megatron.launch.recipes import SUCCESS_STATES, launch_job

    result = launch_job(cfg, launch, name=args.name, wait=not args.detach, dryrun=args.dry_run)
    print(f"maspo launch: {launch.executor} job {result['job_id'] or '-'} {result['state']} (dir {result['job_dir'] or '-'})")
    if args.dry_run or args.detach:
        return 0
    return 0 if result["state"] in SUCCESS_STATES else 1


if __name__ == "__main__":
    sys.exit(main())
