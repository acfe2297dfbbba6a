"""Weight-sync export throughput and peak memory: the bucket iterator vs a plain memory copy.

A Llama-shaped bf16 policy of >= 1 GB (--quick: ~10 MB) runs as TP2 x PP2 on four gloo processes.
Each pipeline stage exports through the real code: "shared bucket" is the syncer's path on one CPU
host (bucket_writer.py: the bucket buffer is /dev/shm mapped by both TP ranks, each writes only its
own shards into it, in parallel); "gathered to the source" is the same iterator with the shards
moved to the source first (what CUDA / several hosts use; on one host via /dev/shm staging); the
"general path" is the FP8 route (TP gather into a fresh full tensor, family table split, bucketing);
"+flatten" also packs every bucket into a fresh uint8 buffer as the tensor transport does. Each case
gets fresh buffers and runs one untimed memory pass (RSS and Pss sampled) and five timed passes; the
time is the best timed pass (a syncer keeps its buffers, so steady state is what a run sees), memory
the worst pass (the first one maps/allocates the reused buffers). Baseline, in the same processes:
`dst.copy_(src)` of the same number of bytes on each stage source (stage-sized, pre-touched buffers,
one bucket-sized slice at a time), and `clone()` of the same slices into fresh memory (allocation +
page faults). Reported: GB/s and ratios (issue target >= 0.5x memcpy); memory as multiples of
bucket_bytes: the sources' peak extra RSS (target <= 2; shared pages count in full in the RSS of
every process that touched them) and the TP group's extra Pss in the memory pass (shared pages split
between the ranks that map them; peak over time of the sum over a stage's ranks, max over stages).

    flock /tmp/maspo_heavy.lock .venv/bin/python benchmarks/weight_sync.py    # full (>= 1 GB)
    .venv/bin/python benchmarks/weight_sync.py --quick                        # smoke size
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from benchmarks._workers import launch_workers  # noqa: E402

WORLD = 4  # TP2 x PP2
FULL = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=4,
            vocab_size=32000, num_hidden_layers=10, bucket_bytes=256 * 2**20)
QUICK = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=4000, num_hidden_layers=4, bucket_bytes=2 * 2**20)
REPEATS = 5  # timed passes, the best counts (a loaded shared machine); the untimed memory pass comes first


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _pss_bytes() -> int:
    """Proportional set size: shared pages divided by the number of processes mapping them."""
    with open("/proc/self/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


class _PeakMem:
    """Samples this process's RSS (and, with pss=True, its Pss: reading smaps_rollup walks the page
    tables, so only in the untimed pass) every millisecond while active."""

    def __init__(self, pss: bool) -> None:
        self._pss = pss
        self.peak_rss = _rss_bytes()
        self.pss_series: list = []  # (time.monotonic(), Pss bytes): the same clock in every process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample()

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_bytes())
        if self._pss:
            self.pss_series.append((time.monotonic(), _pss_bytes()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.001)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _hf_config(shape: dict):
    import transformers

    return transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "bucket_bytes"},
                                    tie_word_embeddings=False, max_position_embeddings=4096)


def _worker(shape: dict, out_path: str) -> None:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist

    from maspo_megatron.config.model import ModelConfig
    from maspo_megatron.config.parallel import ParallelConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed
    from maspo_megatron.rollout.weight_sync.bucket_writer import BucketBuffers, iter_export_buckets
    from maspo_megatron.rollout.weight_sync.bucketing import bucket_nbytes, iter_buckets
    from maspo_megatron.rollout.weight_sync.flattened_bucket import flatten_tensors
    from maspo_megatron.rollout.weight_sync.hf_stream import is_export_source, mapped_parameters, megatron_hf_stream
    from maspo_megatron.rollout.weight_sync.tp_gather import TPGatherer

    parallel = ParallelConfig(tp=2, pp=2)
    dims = init_distributed(parallel, seed=1)
    config, meta = build_model_config(_hf_config(shape), ModelConfig(dtype="bf16"), parallel)
    config.perform_initialization = False  # values do not matter for moving bytes; random init takes minutes
    chunk = gpt_model_provider(config, meta, pre_process=dims.is_first_stage, post_process=dims.is_last_stage)
    with torch.no_grad():
        for param in chunk.parameters():
            param.fill_(0.5)  # touch every page now so the export's RSS growth is its own
    wmap = WeightMap.from_hf_config(_hf_config(shape), tp=2)
    bucket_bytes = shape["bucket_bytes"]
    source = is_export_source(dims)
    result = {"source": source, "rank": dist.get_rank(), "pp_rank": dims.pp_rank}

    buffers = [None]  # fresh per case (its memory is the case's own); kept across its passes, as a syncer does

    def export(flatten: bool = False, general: bool = False, shared=None) -> tuple[float, int, int]:
        moved = largest = 0
        dist.barrier()
        start = time.perf_counter()
        buckets = (iter_buckets(megatron_hf_stream([chunk], wmap, dims), bucket_bytes) if general
                   else iter_export_buckets([chunk], wmap, dims, buffers[0], shared=shared))
        for bucket in buckets:
            moved += bucket_nbytes(bucket)
            largest = max(largest, max(t.numel() * t.element_size() for _, t in bucket))
            if flatten:
                buf, _ = flatten_tensors(bucket, release=True)  # as the tensor transport does
                del buf
            del bucket
        return time.perf_counter() - start, moved, largest

    def gather_only(shared: bool) -> tuple[float, int, int]:
        """The TP gathers alone, no mapping, no buckets: gloo's gather (loopback TCP) or shared memory."""
        moved = 0
        dist.barrier()
        start = time.perf_counter()
        params = list(mapped_parameters(chunk, wmap))
        with torch.no_grad(), TPGatherer([p for _, p in params], dims, use_shared_memory=shared) as gatherer:
            for name, param in params:
                full = gatherer.gather_full(param, *wmap.tp_split(name))
                moved += 0 if full is None else full.numel() * full.element_size()
                del full
        return time.perf_counter() - start, moved, 0

    cases = (("gather_gloo", lambda: gather_only(False)), ("gather", lambda: gather_only(True)),
             ("general", lambda: export(general=True)), ("iterator", lambda: export(shared=False)),
             ("shared", lambda: export()), ("flatten", lambda: export(flatten=True)))
    for key, run_once in cases:
        buffers[0] = BucketBuffers(bucket_bytes)
        best, worst_rss, pss_series = None, 0, []
        for repeat in range(REPEATS + 1):  # pass 0: memory only (Pss sampling costs CPU), untimed
            dist.barrier()
            base_rss = _rss_bytes()
            with _PeakMem(pss=repeat == 0) as peak:
                seconds, moved, largest = run_once()
            if repeat == 0:
                pss_series = [(t, b - peak.pss_series[0][1]) for t, b in peak.pss_series]
            else:
                run = {"seconds": seconds, "bytes": moved, "largest_tensor_bytes": largest}
                best = run if best is None or seconds < best["seconds"] else best
            worst_rss = max(worst_rss, peak.peak_rss - base_rss)
        shared_buffer = buffers[0].shared
        result[key] = dict(best, extra_rss=worst_rss, pss_series=pss_series,
                           shm_bytes=0 if shared_buffer is None else shared_buffer.nbytes)
        buffers[0] = shared_buffer = None  # unmaps the case's buffers before the next case
        dist.barrier()

    stage_bytes = [result["shared"]["bytes"]]
    if source:  # baseline: copy_ of the same bytes (source and target as large as the stage, so no
        # cache reuse flatters it), one bucket-sized slice at a time
        total = stage_bytes[0]
        src = torch.full((total,), 1, dtype=torch.uint8)
        dst = torch.zeros_like(src)  # zeros_like touches the pages before timing
        best_s = None
        for _ in range(REPEATS):
            start = time.perf_counter()
            for offset in range(0, total, bucket_bytes):
                dst[offset:offset + bucket_bytes].copy_(src[offset:offset + bucket_bytes])
            elapsed = time.perf_counter() - start
            best_s = elapsed if best_s is None else min(best_s, elapsed)
        del dst
        # second baseline: the same bytes cloned one bucket at a time into FRESH memory, i.e. the
        # allocation + page-fault cost any export that produces new tensors pays as well
        best_clone = None
        for _ in range(REPEATS):
            start = time.perf_counter()
            for offset in range(0, total, bucket_bytes):
                copy = src[offset:offset + bucket_bytes].clone()
                del copy
            elapsed = time.perf_counter() - start
            best_clone = elapsed if best_clone is None else min(best_clone, elapsed)
        del src
        result["memcpy"] = {"seconds": best_s, "bytes": total, "clone_seconds": best_clone}
    dist.barrier()
    with open(out_path, "w") as handle:
        json.dump(result, handle)
    dist.destroy_process_group()


CASES = (("gather_gloo", "TP gather alone, gloo (loopback TCP)"),
         ("gather", "TP gather alone, /dev/shm staging"),
         ("general", "general path (full tensors, fresh memory; FP8 uses it)"),
         ("iterator", "bucket iterator, shards gathered to the source (CUDA / several hosts)"),
         ("shared", "bucket iterator, shared bucket: each TP rank writes its own shards (one host)"),
         ("flatten", "shared bucket + flatten (tensor transport)"))


def _group_peak(series: list[list]) -> int:
    """Peak over time of the sum of several processes' sampled values (each held until its next sample)."""
    events = sorted((t, index, value) for index, one in enumerate(series) for t, value in one)
    current, peak = [0] * len(series), 0
    for _, index, value in events:
        current[index] = value
        peak = max(peak, sum(current))
    return peak


def _rows(results: list[dict], shape: dict) -> list[dict]:
    sources = [r for r in results if r["source"]]
    total = sum(r["shared"]["bytes"] for r in sources)
    memcpy_s = max(r["memcpy"]["seconds"] for r in sources)  # stages run side by side
    clone_s = max(r["memcpy"]["clone_seconds"] for r in sources)
    bucket = shape["bucket_bytes"]
    largest = max(r["shared"]["largest_tensor_bytes"] for r in sources)
    gather_s = max(r["gather"]["seconds"] for r in sources)
    stages = sorted({r["pp_rank"] for r in results})
    rows = []
    for key, label in CASES:
        seconds = max(r[key]["seconds"] for r in sources)
        extra = max(r[key]["extra_rss"] for r in sources)
        group_pss = max(_group_peak([r[key]["pss_series"] for r in results if r["pp_rank"] == stage]) for stage in stages)
        rows.append({
            "benchmark": "weight_sync", "case": f"{label}, TP2xPP2, {total / 1e9:.2f} GB bf16",
            "ours_GB_per_s": total / seconds / 1e9, "memcpy_GB_per_s": total / memcpy_s / 1e9,
            "ratio_vs_memcpy": memcpy_s / seconds, "clone_GB_per_s": total / clone_s / 1e9,
            "ratio_vs_clone": clone_s / seconds, "ratio_vs_gather_alone": gather_s / seconds,
            "peak_extra_rss_in_buckets": extra / bucket, "tp_group_extra_pss_in_buckets": group_pss / bucket,
            "shm_MiB": max(r[key]["shm_bytes"] for r in sources) / 2**20, "bucket_MiB": bucket / 2**20,
            "largest_tensor_MiB": largest / 2**20,
        })
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small model (smoke run)")
    parser.add_argument("--bucket-mib", type=float, default=None, help="override bucket_bytes (MiB)")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker[0]), args.worker[1])
        return []
    shape = dict(QUICK if args.quick else FULL)
    if args.bucket_mib:
        shape["bucket_bytes"] = int(args.bucket_mib * 2**20)
    with tempfile.TemporaryDirectory(prefix="maspo_ws_bench_") as workdir:
        rows = _rows(launch_workers(__file__, "weight_sync", WORLD, shape, workdir), shape)
    for row in rows:
        print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


if __name__ == "__main__":
    main()
