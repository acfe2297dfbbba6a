"""Reward scoring throughput: the worker pool against sequential in-process scoring, same run.

    .venv/bin/python benchmarks/rewards.py [--quick] [--workers 2] [--limit-s 1.0]

A realistic mix: 90% normal answers (worked text ending in a boxed or `####` answer, in the formats
of MATH and GSM8K, about half of them right) and 10% adversarial outputs (huge exponents, deeply
nested braces, 1 MB of text, invalid UTF-8). Reports samples/s of the pool and of sequential
scoring (same reward, same per-sample limit, in the calling process), their ratio, the p99 wall
time of one batch, and the slowest sample's latency against the limit + 1 s the issue allows.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

NORMAL = [  # (final answer as written, ground truth)
    ("\\frac{1}{2}", "0.5"), ("0.5", "\\frac12"), ("\\frac{3}{4}", "\\frac{2}{3}"), ("12", "12"), ("1,200", "1200"),
    ("50\\%", "0.5"), ("[1, 3)", "[1,3)"), ("(1, 3)", "[1,3)"), ("\\{1,2\\}", "\\{2,1\\}"), ("5 \\text{ cm}", "5"),
    ("2\\sqrt{2}", "\\sqrt{8}"), ("x^2+2x+1", "(x+1)^2"), ("\\pi/2", "\\frac{\\pi}{2}"), ("-7", "7"), ("3.75", "\\frac{15}{4}"),
    ("\\text{(B)}", "B"), ("\\dfrac{4}{6}", "\\frac23"), ("18", "81"),
]
ADVERSARIAL = [
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^{9^{9^{9}}}}",
    "\\boxed{(10^{10})!}",
    "\\boxed{" + "{" * 10_000 + "1" + "}" * 10_000 + "}",
    "x" * 1_000_000,
    b"\xff\xfe\xfd reasoning \x80 \\boxed{\xc3\x28}",
    "\\boxed{" + "{" * 200 + "1" + "}" * 200 + "}",
    "\\boxed{" + "1+" * 200_000 + "1}",
]


def make_mix(count: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    filler = "Let us compute step by step. We have 3 \\cdot 4 = 12 and then subtract 5 to get 7. " * 8
    samples = []
    for i in range(count):
        if i % 10 == 9:
            samples.append((ADVERSARIAL[(i // 10) % len(ADVERSARIAL)], "7"))
            continue
        answer, truth = rng.choice(NORMAL)
        ending = f"#### {answer}" if answer.replace(",", "").isdigit() and rng.random() < 0.5 else f"So the answer is $\\boxed{{{answer}}}$."
        samples.append((filler[: rng.randint(100, len(filler))] + ending, truth))
    return samples


def run_interleaved(pool, sequential, batches) -> dict:
    """Scores every batch with both scorers, alternating which goes first, so both see the same
    machine load over time (the shared 2-core machines are rarely quiet)."""
    out = {name: {"batch_s": [], "slowest_s": 0.0, "results": []} for name in ("pool", "sequential")}
    for i, batch in enumerate(batches):
        order = [("pool", pool), ("sequential", sequential)]
        for name, scorer in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            out[name]["results"].extend(scorer.score(batch))
            out[name]["batch_s"].append(time.perf_counter() - t0)
            out[name]["slowest_s"] = max([out[name]["slowest_s"]] + scorer.last_latencies_s)
    return out


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 samples instead of 400")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--limit-s", type=float, default=2.0, help="per-sample time limit")
    parser.add_argument("--batch", type=int, default=100, help="samples per scored batch (one RL step)")
    args = parser.parse_args(argv)

    from maspo_megatron.rewards import RewardScorer

    samples = make_mix(100 if args.quick else 400)
    batches = [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
    sequential = RewardScorer(name="math", timeout_s=args.limit_s, num_workers=0)
    sequential.score(samples[:4])  # math-verify builds its LaTeX parser on first use: not part of the rate
    with RewardScorer(name="math", timeout_s=args.limit_s, num_workers=args.workers) as pool:
        pool.score(samples[:4])  # wait until the workers are up: start-up is paid once per run, not per step
        out = run_interleaved(pool, sequential, batches)
    pool_batches, seq_batches = out["pool"]["batch_s"], out["sequential"]["batch_s"]
    pool_s, seq_s, pool_slowest = sum(pool_batches), sum(seq_batches), out["pool"]["slowest_s"]
    pairs = zip(out["pool"]["results"], out["sequential"]["results"], strict=True)
    agree = sum(a.reason.split(" ")[0] == b.reason.split(" ")[0] for a, b in pairs)
    pool_rate, seq_rate = len(samples) / pool_s, len(samples) / seq_s
    rows = [
        {"case": f"samples/s, {len(samples)} mixed (10% adversarial), {args.workers} workers vs sequential",
         "ours": pool_rate, "baseline": seq_rate, "ratio": pool_rate / seq_rate},
        {"case": f"p99 batch wall s ({args.batch} samples), pool vs sequential",
         "ours": p99(pool_batches), "baseline": p99(seq_batches), "ratio": p99(pool_batches) / p99(seq_batches)},
        {"case": f"slowest sample s vs allowed limit+1 = {args.limit_s + 1:.1f} s",
         "ours": pool_slowest, "baseline": args.limit_s + 1.0, "ratio": pool_slowest / (args.limit_s + 1.0)},
        {"case": "verdicts equal to sequential (fraction)", "ours": agree / len(samples), "baseline": 1.0, "ratio": agree / len(samples)},
    ]
    for row in rows:
        print(f"{row['case']:<70} ours={row['ours']:10.3f} baseline={row['baseline']:10.3f} ratio={row['ratio']:6.2f}")
    return rows


if __name__ == "__main__":
    main()
