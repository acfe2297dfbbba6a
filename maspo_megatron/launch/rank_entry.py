"""Per-rank entry that nemo-run starts: `python -m maspo_megatron.launch.rank_entry --module M --config-b64 B [overrides]`.

It exists for two reasons. (1) The training config travels inside the command line (base64 YAML
of the validated `Config`), so a job launched locally and one launched on Slurm run exactly the
same config object, with no file to copy through a tunnel. (2) nemo-run's plain srun launch sets
no rendezvous: under srun this fills MASTER_ADDR from the allocation (`scontrol show hostnames`)
and MASTER_PORT from the job id, as slurm/common.sh does (`parallel/launch_env.py`). Then it runs `python -m M --config FILE`
in this process, so M's exit code (75 = checkpoint saved, requeue me) is the task's exit code.
"""
from __future__ import annotations

import argparse
import base64
import os
import runpy
import sys
import tempfile


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="maspo_megatron.launch.rank_entry")
    parser.add_argument("--module", default="maspo_megatron.train", help="module run as __main__")
    parser.add_argument("--config-b64", required=True, help="base64 of the training config YAML")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        text = base64.b64decode(args.config_b64, validate=True).decode()
    except ValueError as exc:
        raise SystemExit(f"rank_entry: --config-b64 is not valid base64 ({exc})") from None
    from maspo_megatron.parallel.launch_env import slurm_rendezvous  # imports torch: after the arguments

    os.environ.update(slurm_rendezvous(dict(os.environ)))
    fd, path = tempfile.mkstemp(prefix="maspo-config-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    sys.argv = [args.module, "--config", path, *args.overrides]
    try:
        runpy.run_module(args.module, run_name="__main__", alter_sys=True)
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
