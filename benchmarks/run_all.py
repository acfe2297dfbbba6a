"""Runs every benchmark of the project and prints one table of ratios against each baseline.

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--out docs/benchmarks.md]

Each benchmark module in this folder exposes `main(argv=None) -> list[dict]`; every row names its
benchmark case, the measured figure of our implementation and of the baseline run in the same
process, and the ratio. Rows are printed as one Markdown table (and written to --out when given,
with the machine description).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["policy_loss", "logprob_entropy", "convert", "weight_sync", "sample_handoff", "rewards", "rollout_client"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmarks.{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def machine() -> str:
    import torch

    cores = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.processor() or platform.machine()}, {cores} cores, {mem_gib:.0f} GiB, torch {torch.__version__}, Python {platform.python_version()}"


def format_table(rows: list[dict]) -> str:
    columns = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key in columns:
            value = row.get(key, "")
            cells.append(f"{value:.3g}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--only", nargs="*", default=None, choices=BENCHMARKS)
    parser.add_argument("--out", default=None, help="write the table to this Markdown file")
    args = parser.parse_args(argv)
    rows: list[dict] = []
    failures = []
    for name in args.only or BENCHMARKS:
        if not (HERE / f"{name}.py").exists():
            failures.append(f"{name}: benchmarks/{name}.py is missing")
            continue
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = load(name).main(["--quick"] if args.quick else [])
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        for row in result:
            rows.append({"benchmark": name, **row})
        print(f"   ({time.perf_counter() - start:.0f} s)", flush=True)
    # One table per benchmark: their columns differ, and a union of all of them is unreadable.
    sections = []
    for name in dict.fromkeys(row["benchmark"] for row in rows):
        own = [{k: v for k, v in row.items() if k != "benchmark"} for row in rows if row["benchmark"] == name]
        sections.append(f"### {name}\n\n{format_table(own)}")
    table = "\n\n".join(sections) if sections else "(no rows)"
    print(table)
    if args.out:
        header = f"Machine: {machine()}\nMode: {'quick' if args.quick else 'full'}\n\n"
        Path(args.out).write_text(header + table + "\n")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
