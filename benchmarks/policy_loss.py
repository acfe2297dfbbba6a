"""Cost of the policy losses (forward + backward, with masking, fp32 upcast and metrics) against a
bare inline fp32 GRPO clip on the same tokens, measured in the same process.

    .venv/bin/python benchmarks/policy_loss.py [--quick]

The ratio says what the shared preparation (mask sanitising, upcast, per-token metrics) and each
loss's extra math cost relative to the cheapest possible clipped loss. On a GPU trainer all of it is
negligible next to the model's forward; this guards against an accidental O(T^2) or a host sync.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable as a script from a clean clone
    sys.path.insert(0, str(ROOT))

from maspo_megatron.algorithms import POLICY_LOSSES, aggregate_loss, loss_spec, policy_loss  # noqa: E402


def _inputs(rows: int, cols: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.empty(rows, cols).exponential_(0.5, generator=gen)
    log_prob = (old + 0.3 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
    adv = torch.randn(rows, 1, generator=gen).expand(rows, cols)
    mask = torch.rand(rows, cols, generator=gen) < 0.9
    return log_prob, old.to(torch.bfloat16), adv, mask


def _baseline_grpo(log_prob, old, adv, mask, eps=0.2):
    """The cheapest clipped loss: no sanitising, no metrics."""
    ratio = torch.exp(log_prob.float() - old.float())
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - eps, 1 + eps))
    return (loss * mask).sum() / mask.sum()


def _median_s(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch (smoke run)")
    args = parser.parse_args(argv)
    rows_, cols = (8, 512) if args.quick else (64, 4096)
    repeats = 21 if args.quick else 15
    log_prob, old, adv, mask = _inputs(rows_, cols)
    tokens = int(mask.sum())

    def step(loss_fn):
        def run():
            lp = log_prob.detach().requires_grad_()
            loss_fn(lp).backward()

        return run

    baseline_s = _median_s(step(lambda lp: _baseline_grpo(lp, old, adv, mask)), repeats)
    rows = []
    entropy = (-old.float()).clamp(max=3.0)  # any [B, T] values; the losses that ask for it detach it
    for name in sorted(POLICY_LOSSES):
        inputs = {"entropy": entropy} if "entropy" in loss_spec(name).inputs else {}
        ours_s = _median_s(
            step(lambda lp, n=name, kw=inputs: aggregate_loss(
                policy_loss(n, lp, old, adv, mask, **kw)[0], mask, "token-mean", global_token_count=tokens)),
            repeats,
        )
        rows.append({
            "case": f"{name}: fwd+bwd ms, [{rows_}, {cols}] bf16 in, vs inline fp32 GRPO clip",
            "ours": ours_s * 1e3,
            "baseline": baseline_s * 1e3,
            "ratio": ours_s / baseline_s,
        })
    for row in rows:
        print(f"{row['case']:<70} ours={row['ours']:9.2f} baseline={row['baseline']:9.2f} ratio={row['ratio']:6.2f}")
    return rows


if __name__ == "__main__":
    main()
