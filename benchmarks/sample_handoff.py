"""Benchmark: the driver -> ranks sample hand-off, flat tensors vs `broadcast_object_list`.

Two CPU processes on gloo (loopback TCP). Rank 0 holds the samples as the rollout phase builds
them (Python lists of token ids, fp32 log-probs as Python floats, one scalar advantage each);
2,048 samples x 8,192 tokens (1,024 prompt + 7,168 response) by default. Each pass: barrier, hand
off, barrier (so the receivers' unpacking counts); the best of several passes is reported, ours and
the baseline interleaved in the same processes. "ours" is `trainer/sample_handoff.broadcast_samples`
(pack on rank 0, five tensor broadcasts, views on the receiver); the baseline is what train_step
did before: `dist.broadcast_object_list([samples])` (pickle, one byte broadcast, unpickle).
Issue 16 target: >= 5x. Three representations of the same samples on the driver, each with both
methods: Python lists (what rollout_phase builds today), log-probs kept as the rollout Sample's fp32
tensors (rollout_phase without its `.tolist()`), and ids as int32 tensors as well. With lists, ours
is bounded by reading ~31M Python numbers into arrays on rank 0.

    flock /tmp/maspo_heavy.lock .venv/bin/python benchmarks/sample_handoff.py    # full (~3 GB RAM)
    .venv/bin/python benchmarks/sample_handoff.py --quick                        # smoke size
"""
from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._workers import launch_workers  # noqa: E402

WORLD = 2
FULL = dict(samples=2048, prompt_tokens=1024, response_tokens=7168, repeats=3)
QUICK = dict(samples=64, prompt_tokens=128, response_tokens=896, repeats=3)
VOCAB = 151_936


def _make_samples(shape: dict):
    import torch

    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(0)
    samples = []
    for index in range(shape["samples"]):
        prompt = torch.randint(0, VOCAB, (shape["prompt_tokens"],), generator=gen).tolist()
        response = torch.randint(0, VOCAB, (shape["response_tokens"],), generator=gen).tolist()
        log_probs = (-torch.rand(shape["response_tokens"], generator=gen) * 5).tolist()
        samples.append(TrainSample(prompt, response, float(index % 7) / 7 - 0.5, log_probs))
    return samples


def _worker(shape: dict, out_path: str) -> None:
    import dataclasses
    import types

    import torch
    import torch.distributed as dist

    from maspo_megatron.trainer.sample_handoff import pack_samples

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    dims = types.SimpleNamespace(rank=dist.get_rank(), world_size=dist.get_world_size())
    lists = _make_samples(shape) if dims.rank == 0 else None
    # the same samples with the log-probs kept as the engine's fp32 tensors (rollout Sample.log_probs)
    tensors = None if lists is None else [dataclasses.replace(s, old_log_probs=torch.tensor(s.old_log_probs))
                                          for s in lists]
    # ... and with the token ids as int32 tensors too (converted where the engine's answers arrive)
    all_tensors = None if lists is None else [
        dataclasses.replace(s, prompt_ids=torch.tensor(s.prompt_ids, dtype=torch.int32),
                            response_ids=torch.tensor(s.response_ids, dtype=torch.int32)) for s in tensors]
    result = {"rank": dims.rank}
    for variant, samples in (("lists", lists), ("lp_tensors", tensors), ("all_tensors", all_tensors)):
        result[variant] = _time_variant(samples, dims, shape)
        if dims.rank == 0:  # sizes on the wire, untimed
            result[variant]["ours_bytes"] = sum(t.numel() * t.element_size() for t in pack_samples(samples))
            result[variant]["pickle_bytes"] = len(pickle.dumps(samples, protocol=pickle.HIGHEST_PROTOCOL))
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


def _time_variant(samples, dims, shape: dict) -> dict:
    """Best seconds of ours and of the baseline (interleaved passes), barrier to barrier."""
    import torch.distributed as dist

    from maspo_megatron.trainer.sample_handoff import broadcast_samples

    def ours():
        return broadcast_samples(samples, dims)

    def baseline():
        box = [samples if dims.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    best = {"ours": None, "baseline": None}
    for _ in range(shape["repeats"]):
        for key, fn in (("baseline", baseline), ("ours", ours)):
            dist.barrier()
            start = time.perf_counter()
            received = fn()
            dist.barrier()
            elapsed = time.perf_counter() - start
            best[key] = elapsed if best[key] is None else min(best[key], elapsed)
            # what arrived must be the driver's (first and last sample, ids and lengths)
            assert len(received) == shape["samples"]
            for sample in (received[0], received[-1]):
                assert len(sample.prompt_ids) == shape["prompt_tokens"]
                assert len(sample.response_ids) == shape["response_tokens"]
            del received
    return best


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="passes per method (the best counts; default 3)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker[0]), args.worker[1])
        return []
    shape = dict(QUICK if args.quick else FULL)
    if args.repeats:
        shape["repeats"] = args.repeats
    with tempfile.TemporaryDirectory(prefix="maspo_handoff_bench_") as workdir:
        results = launch_workers(__file__, "sample_handoff", WORLD, shape, workdir)
    tokens = shape["samples"] * (shape["prompt_tokens"] + shape["response_tokens"])
    rows = []
    for variant, label in (("lists", "driver holds lists (today's rollout_phase)"),
                           ("lp_tensors", "driver keeps log-probs as the engine's fp32 tensors"),
                           ("all_tensors", "driver holds ids (int32) and log-probs as tensors")):
        ours_s = max(r[variant]["ours"] for r in results)  # equal up to the last barrier's skew
        base_s = max(r[variant]["baseline"] for r in results)
        rows.append({"case": f"{shape['samples']} samples x {shape['prompt_tokens'] + shape['response_tokens']} tokens, "
                             f"{WORLD} ranks, gloo; {label}", "ours_s": ours_s, "broadcast_object_list_s": base_s,
                     "ratio": base_s / ours_s, "ours_MB": results[0][variant]["ours_bytes"] / 1e6,
                     "pickle_MB": results[0][variant]["pickle_bytes"] / 1e6, "ours_Mtok_per_s": tokens / ours_s / 1e6})
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    return rows


if __name__ == "__main__":
    main()
