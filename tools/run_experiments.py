"""Runs the MASPO reproduction sweep on the CPU synthetic task and writes its report (docs/experiments/full_experiment.md).

    .venv/bin/python tools/run_experiments.py [--sweep examples/experiments/sweep.yaml]
        [--out outputs/experiments] [--workers N] [--methods NAME ...] [--seeds S ...]
        [--set dotted.key=value ...] [--report docs/experiments/full_experiment.md] [--report-only | --no-report]

Phases: (1) the task's problems split into train.jsonl and heldout.jsonl (disjoint); (2) one supervised warm-up per seed
(tools/_experiments_warmup.py); (3) every method x seed as its own `maspo_megatron.train`
process starting from its seed's warm-up (`--workers` at a time, OMP_NUM_THREADS=1 each); (4) the
report (tools/_experiments_report.py): plots, tables, raw CSV/JSON next to it.
Resumable: a job whose marker file exists (warmup_eval.json / final_eval.json) and whose
arguments (job.json) are those of the current sweep is not rerun; any other job's directory is
wiped and the job starts from its beginning. Exit status 0
when every job finished, 1 when some failed (the report still covers the finished ones), 2 for a
bad sweep file or option.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from _experiments_plan import Job, SweepError, check_overrides, load_sweep, plan_jobs, write_task_files  # noqa: E402

STATUS_FILE = "status.json"
_PORT_RETRIES = 2  # a free port picked here can be taken by another process before the job binds it
# Variables that would make a job join someone else's torch.distributed world.
_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID",
             "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "MASTER_PORT")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env() -> Dict[str, str]:
    """One single-process rank per job, one thread per job, nothing fetched."""
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p))
    return env


class Runner:
    """Runs jobs, `parallel` at a time; RL jobs wait for their seed's warm-up."""

    def __init__(self, jobs: List[Job], root: Path, parallel: int, timeout_s: Optional[float], log=print) -> None:
        self.jobs = jobs
        self.root = root
        self.parallel = parallel
        self.timeout_s = timeout_s
        self.log = log
        self.status_path = root / STATUS_FILE
        self.status = json.loads(self.status_path.read_text()) if self.status_path.is_file() else {}

    def _save_status(self) -> None:
        tmp = self.status_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status, indent=1, sort_keys=True))
        tmp.replace(self.status_path)

    def _start(self, job: Job) -> tuple:
        shutil.rmtree(job.out_dir, ignore_errors=True)  # an unfinished run restarts from its beginning
        job.out_dir.mkdir(parents=True)
        job.spec_file.write_text(json.dumps(job.spec(), indent=1))
        log_file = open(job.out_dir / "log.txt", "w")
        proc = subprocess.Popen(job.argv, cwd=REPO, env=job_env(), stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
        return proc, log_file, time.monotonic()

    def run(self) -> List[str]:
        """Runs every unfinished job; returns the names of the jobs that failed."""
        pending = [job for job in self.jobs if not job.is_done()]
        skipped = len(self.jobs) - len(pending)
        if skipped:
            self.log(f"{skipped} job(s) already finished: not rerun")
        failed: List[str] = []
        failed_seeds = set()
        attempts: Dict[str, int] = {}
        running: Dict[str, tuple] = {}
        total = len(pending)
        finished = 0
        try:
            while pending or running:
                for job in list(pending):
                    if len(running) >= self.parallel:
                        break
                    if job.kind == "rl" and job.seed in failed_seeds:
                        pending.remove(job)
                        failed.append(job.name)
                        self.log(f"skip {job.name}: the warm-up of seed {job.seed} failed")
                        continue
                    warm_busy = any(r.kind == "warmup" and r.seed == job.seed for r, *_ in running.values())
                    warm_waiting = any(p.kind == "warmup" and p.seed == job.seed for p in pending if p is not job)
                    if job.kind == "rl" and (warm_busy or warm_waiting):
                        continue
                    pending.remove(job)
                    attempts[job.name] = attempts.get(job.name, 0) + 1
                    running[job.name] = (job, *self._start(job))
                    self.log(f"{time.strftime('%H:%M:%S')} start {job.name}")
                time.sleep(0.5)
                for name, (job, proc, log_file, started) in list(running.items()):
                    elapsed = time.monotonic() - started
                    if proc.poll() is None and self.timeout_s and elapsed > self.timeout_s:
                        os.killpg(proc.pid, 15)
                        proc.wait()
                    code = proc.poll()
                    if code is None:
                        continue
                    log_file.close()
                    del running[name]
                    if code == 0 and job.is_done():
                        finished += 1
                        self.status[name] = {"wall_s": round(elapsed, 1), "finished_unix": round(time.time(), 1),
                                             "started_unix": round(time.time() - elapsed, 1)}
                        self._save_status()
                        self.log(f"{time.strftime('%H:%M:%S')} done  {name} in {elapsed:.0f} s ({finished}/{total})")
                        continue
                    text = (job.out_dir / "log.txt").read_text(errors="replace")
                    if "EADDRINUSE" in text and attempts[name] <= _PORT_RETRIES:
                        pending.insert(0, job)
                        continue
                    failed.append(name)
                    if job.kind == "warmup":
                        failed_seeds.add(job.seed)
                    tail = [line for line in text.splitlines() if line.strip()][-1:] or ["(no output)"]
                    self.log(f"{time.strftime('%H:%M:%S')} FAILED {name} (exit {code}): {tail[0][:200]} "
                             f"[{job.out_dir / 'log.txt'}]")
        finally:
            for _job, proc, log_file, _ in running.values():  # interrupted: stop our own children only
                os.killpg(proc.pid, 15)
                proc.wait()
                log_file.close()
        return failed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", default=str(REPO / "examples" / "experiments" / "sweep.yaml"))
    parser.add_argument("--out", default=str(REPO / "outputs" / "experiments"), help="run directories")
    parser.add_argument("--workers", "--jobs", type=int, default=os.cpu_count() or 1, dest="jobs",
                        help="runs at once, one core each (default: every core of this machine)")
    parser.add_argument("--methods", nargs="*", default=None, help="subset of the sweep's methods")
    parser.add_argument("--seeds", nargs="*", type=int, default=None, help="subset of the sweep's seeds")
    parser.add_argument("--set", nargs="*", default=[], dest="extra", metavar="KEY=VALUE",
                        help="dotted overrides for every job (e.g. trainer.total_steps=2)")
    parser.add_argument("--timeout-s", type=float, default=None, help="kill a job running longer than this")
    parser.add_argument("--report", default=str(REPO / "docs" / "experiments" / "full_experiment.md"),
                        help="the generated report (docs/experiments.md is written by hand from it and the mechanism check)")
    parser.add_argument("--figures-dir", default=None, help="plots and raw data (default: <report dir>/experiments)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--report-only", action="store_true", help="no runs: rebuild the report from finished ones")
    mode.add_argument("--no-report", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.out).resolve()
    try:
        if args.jobs < 1:
            raise SweepError(f"--workers: {args.jobs} must be >= 1")
        sweep = load_sweep(args.sweep)
        bases = {m.base for m in sweep.methods.values() if m.base}
        for name in args.methods or []:
            if name not in sweep.methods and name not in bases:
                raise SweepError(f"--methods: {name!r} is not in {args.sweep} (known: {', '.join(sweep.methods)})")
        if args.methods:  # a method of a learning-rate grid names all its copies
            args.methods = [n for n, m in sweep.methods.items() if n in args.methods or m.base in args.methods]
        for seed in args.seeds or []:
            if seed not in sweep.seeds:
                raise SweepError(f"--seeds: {seed} is not in {args.sweep} (seeds: {sweep.seeds})")
        check_overrides(sweep, args.extra)
        task_files = None if args.report_only else write_task_files(sweep, root, args.extra)
    except SweepError as exc:
        print(f"run_experiments: {exc}", file=sys.stderr)
        return 2
    failed: List[str] = []
    if not args.report_only:
        jobs = plan_jobs(sweep, root, task_files, args.extra, methods=args.methods, seeds=args.seeds)
        started = time.monotonic()
        failed = Runner(jobs, root, args.jobs, args.timeout_s).run()
        print(f"sweep: {len(jobs) - len(failed)}/{len(jobs)} jobs finished; {time.monotonic() - started:.0f} s this call")
    if not args.no_report:
        from _experiments_report import build_report

        report = Path(args.report)
        figures = Path(args.figures_dir) if args.figures_dir else report.parent / report.stem
        build_report(sweep, root, report, figures, extra=args.extra)
        print(f"report: {report}")
    for name in failed:
        print(f"FAILED {name}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
