"""A stand-in for `python -m maspo_megatron.train` that keeps the launcher CONTRACT strictly.

The sbatch scripts and nemo-run recipes are tested against it (MASPO_TRAIN_MODULE=contract_trainer)
so they can be checked before, and independently of, the real RL loop; the same tests run against
the real entry point too. What it enforces and does, exactly as the real trainer must:
  - rank/world from RANK/WORLD_SIZE/LOCAL_RANK or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and a
    real gloo rendezvous at MASTER_ADDR:MASTER_PORT (missing variables are an error, not a default);
  - the config is loaded and validated with the real `load_config` (file + dotted overrides);
  - one all-reduce per step; <output_dir>/metrics.jsonl gets {"step", "world_size", "allreduce"};
  - checkpoints in <output_dir>/checkpoints/step_<N>/ then the `latest` pointer, written last;
  - SIGUSR1/SIGTERM: finish the step, save, exit 75; trainer.resume resumes from `latest`.
CONTRACT_STEP_S (env) makes each step sleep, so a test can signal mid-run.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

EXIT_REQUEUE = 75


def _rank_env() -> tuple[int, int, int]:
    for names in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if all(n in os.environ for n in names):
            return tuple(int(os.environ[n]) for n in names)  # type: ignore[return-value]
    if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
        raise SystemExit("contract_trainer: incomplete rank variables")
    return 0, 1, 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    stop = {"signal": None}
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # installed first: a signal during imports must not kill us
        signal.signal(sig, lambda signum, _frame: stop.update(signal=signum))

    import torch
    import torch.distributed as dist

    from maspo_megatron.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"contract_trainer: config error: {exc}", file=sys.stderr)
        return 2
    rank, world, _local = _rank_env()
    if world > 1:
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise SystemExit(f"contract_trainer: {name} is not set by the launcher")
        dist.init_process_group("gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                                rank=rank, world_size=world)
    out = Path(cfg.trainer.output_dir)
    ckpt_root = out / "checkpoints"
    start = 0
    if cfg.trainer.resume and (ckpt_root / "latest").is_file():
        latest = ckpt_root / (ckpt_root / "latest").read_text().strip()
        start = json.loads((latest / "state.json").read_text())["step"]
    step_s = float(os.environ.get("CONTRACT_STEP_S", "0"))

    def save(step: int) -> None:
        if world > 1:
            dist.barrier()
        if rank == 0:
            target = ckpt_root / f"step_{step}"
            target.mkdir(parents=True, exist_ok=True)
            (target / "state.json").write_text(json.dumps({"step": step}))
            tmp = ckpt_root / "latest.tmp"
            tmp.write_text(target.name)
            tmp.replace(ckpt_root / "latest")  # the pointer is updated last, atomically
        if world > 1:
            dist.barrier()

    out.mkdir(parents=True, exist_ok=True)
    step = start
    while step < cfg.trainer.total_steps:
        time.sleep(step_s)
        value = torch.tensor([float(rank + 1)])
        if world > 1:
            dist.all_reduce(value)
        step += 1
        if rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "world_size": world, "allreduce": value.item(),
                                    "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0"))}) + "\n")
        flag = torch.tensor([1.0 if stop["signal"] else 0.0])
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            save(step)
            return EXIT_REQUEUE
        if cfg.trainer.save_every and step % cfg.trainer.save_every == 0:
            save(step)
    save(step)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
