"""Rollout client throughput: the asyncio SGLang client vs a plain sequential `requests` loop.

Both talk to the same stand-in server subprocess (tests/helpers/sglang_standin --zero-latency: it
answers /generate with fixed tokens, no model). "Requests" are samples to generate. The baseline is a
plain `requests` loop, one sample per POST on a keep-alive session. The client runs at concurrency
(samples in flight) 1, 64 and 512, with its default batching (`samples_per_request`, several samples
per HTTP request) and with samples_per_request=1 (one HTTP request per sample). Two scenarios, each
with its own sequential baseline:
- zero-latency server: answers at once, so only client + server CPU cost is measured (samples per
  second, and the latency the client adds per sample at concurrency 1). Both sides are Python
  processes on the same cores here;
- server answers after a fixed service time per HTTP request (an asyncio sleep, no CPU): what
  overlapping requests buys.
Rows are ratios against the sequential loop measured in the same run: the zero-latency cases run 3
times interleaved with the baseline (median of each), since other jobs on the same cores move both.

    python benchmarks/rollout_client.py            # 8192 samples per concurrent measurement
    python benchmarks/rollout_client.py --quick    # smoke size
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from maspo_megatron.config import SGLangConfig  # noqa: E402
from maspo_megatron.rollout.sglang import SGLangEngine  # noqa: E402
from maspo_megatron.rollout.sglang.launcher import ServerLauncher  # noqa: E402
from maspo_megatron.rollout.sglang.protocol import generate_payload  # noqa: E402
from maspo_megatron.rollout.types import SamplingParams  # noqa: E402

# The stand-in server is started by path, as the trainer starts SGLang (`rollout.sglang.launch_command`):
# nothing of the test suite is imported here.
STANDIN = ROOT / "tests" / "helpers" / "sglang_standin"

SAMPLING = SamplingParams(max_new_tokens=8)
PROMPT = list(range(1, 33))


def start_server(extra: list[str]) -> tuple[ServerLauncher, str]:
    """One stand-in server through the product's own launcher (which stops it whole on failure)."""
    cfg = SGLangConfig(launch_command=[sys.executable, str(STANDIN), "--zero-latency", *extra], startup_timeout_s=120)
    launcher = ServerLauncher(cfg, model_path="unused-by-the-stand-in")
    (url,), _ = launcher.launch()
    return launcher, url


def sequential_loop(url: str, count: int) -> float:
    """Plain `requests.post` in a loop (one keep-alive session) -> seconds."""
    payload = generate_payload(PROMPT, SAMPLING)
    with requests.Session() as session:
        started = time.perf_counter()
        for _ in range(count):
            response = session.post(url + "/generate", json=payload, timeout=30)
            response.raise_for_status()
            response.json()
        return time.perf_counter() - started


def client_run(url: str, count: int, concurrency: int, samples_per_request: int) -> float:
    engine = SGLangEngine(SGLangConfig(urls=[url], max_concurrency=concurrency, samples_per_request=samples_per_request,
                                       request_timeout_s=120))
    try:
        engine.generate([PROMPT] * concurrency, 1, SAMPLING)  # open the connection pool this run will use
        started = time.perf_counter()
        groups = engine.generate([PROMPT] * count, 1, SAMPLING)
        elapsed = time.perf_counter() - started
        assert len(groups) == count and all(len(g[0].token_ids) == SAMPLING.max_new_tokens for g in groups)
        return elapsed
    finally:
        engine.shutdown()


def measure(scenario: str, server_args: list[str], count: int, sequential_count: int, repeats: int) -> list[dict]:
    """Every case `repeats` times, interleaved (sequential loop, then each client case, again ...),
    so a load spike from other jobs hits baseline and client alike; rows report the median rate."""
    launcher, url = start_server(server_args)
    batched = SGLangConfig().samples_per_request
    cases = [(1, 1, sequential_count)] + [(c, k, count if k > 1 else count // 2)  # unbatched is slower: fewer samples
                                          for c in (64, 512) for k in (batched, 1)]
    seq_s: list[float] = []
    client_s: dict[tuple, list[float]] = {case: [] for case in cases}
    try:
        sequential_loop(url, 16)  # warm-up
        for _ in range(repeats):
            seq_s.append(sequential_loop(url, sequential_count))
            for concurrency, per_request, n in cases:
                client_s[(concurrency, per_request, n)].append(client_run(url, n, concurrency, per_request))
    finally:
        launcher.shutdown()
    seq_rps = sequential_count / statistics.median(seq_s)
    seq_latency_ms = 1000 / seq_rps
    rows = [{"bench": "rollout_client", "scenario": scenario, "case": "sequential requests loop",
             "requests": sequential_count, "runs": repeats, "req_per_s": round(seq_rps, 1),
             "ms_per_req": round(seq_latency_ms, 3), "ratio_vs_sequential": 1.0}]
    for (concurrency, per_request, n), times in client_s.items():
        rps = n / statistics.median(times)
        row = {"bench": "rollout_client", "scenario": scenario,
               "case": f"client, concurrency {concurrency}, {per_request} sample(s)/request",
               "requests": n, "runs": repeats, "req_per_s": round(rps, 1), "ms_per_req": round(1000 / rps, 3),
               "ratio_vs_sequential": round(rps / seq_rps, 2)}
        if concurrency == 1:
            # What the client adds per sample over the plain loop (both wait for the same server).
            row["added_latency_ms"] = round(1000 / rps - seq_latency_ms, 3)
        rows.append(row)
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke size")
    parser.add_argument("--requests", type=int, default=None, help="samples per concurrent measurement")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved repetitions of the zero-latency scenario (median reported; default 3, quick 1)")
    parser.add_argument("--service-ms", type=float, default=100.0,
                        help="server time per HTTP request of the second scenario (asyncio sleep in the stand-in; real generation takes seconds)")
    args = parser.parse_args(argv)
    count = args.requests or (1024 if args.quick else 8192)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = measure("zero-latency server", [], count, max(64, count // 8), repeats)
    delay = ["--response-delay-s", str(args.service_ms / 1000)]
    rows += measure(f"server answers after {args.service_ms:g} ms", delay, count, 16 if args.quick else 50, 1)
    print(f"{'scenario':<30} {'case':<42} {'samples':>8} {'samples/s':>9} {'ms/smp':>8} {'x seq':>7} {'added ms':>9}")
    for row in rows:
        print(f"{row['scenario']:<30} {row['case']:<42} {row['requests']:>8} {row['req_per_s']:>9} {row['ms_per_req']:>8} "
              f"{row['ratio_vs_sequential']:>7} {row.get('added_latency_ms', ''):>9}")
    return rows


if __name__ == "__main__":
    main()
