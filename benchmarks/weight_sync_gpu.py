"""Benchmark (GPU): colocated weight sync of a 7B-shaped bf16 policy through CUDA IPC, one GPU.

The trainer process builds a Qwen2.5-7B-shaped Megatron-Core policy with the project's builders
(`build_model_config` + `gpt_model_provider`, TP1, bf16, random weights) and exports it with the
project's bucket iterator (`rollout/weight_sync/bucket_writer.iter_export_buckets`: HF names, q/k/v
and gate/up split, vocab trimmed, 16-byte aligned tensors in one reused uint8 bucket buffer). Each
bucket becomes one flattened-bucket payload (`serialize_payload`: a CUDA IPC handle through
torch.multiprocessing's reducers, pickled with SGLang's metadata class name) sent over a pipe to a
second process on the same GPU, which rebuilds the tensors with the project's receiving side
(`load_payload` -> `reconstruct_tensors`, the counterpart of SGLang's
`FlattenedTensorBucket.reconstruct_tensors`; SGLang itself cannot travel to the GPU test machine,
whose uploads are capped at 64 MiB) and copies them into a same-shaped HF `Qwen2ForCausalLM` there
(built on the meta device, then `to_empty` on the GPU), then acknowledges.

Two ways to make the payload, timed in the same run:
- "flatten": `flatten_tensors(bucket)` into a FRESH buffer, as the `tensor` transport does today
  (two buckets alive on the trainer: the iterator's buffer and the flattened copy);
- "views": the iterator's bucket buffer itself is the flattened bucket (its tensors already lie at
  aligned offsets of one uint8 buffer), so no copy and one bucket alive.
Baseline, same run: a plain per-tensor `copy_` of the same HF state dict (a clone already on the
GPU) into the HF model inside the receiving process: the device-copy floor of one sync.

Reported: seconds per sync (best and median of --repeats after one warm-up sync), end to end from
the first bucket's export to the last bucket's acknowledgement (the receiver synchronises before
it acknowledges); extra GPU memory of the trainer process (caching-allocator peak above its
parameters) in bytes and in buckets (issue 16: <= 0.3 s, <= 1 bucket), and whether every HF tensor
arrived with the checksums (sum, strided fingerprint) of the policy's own HF export.

    python benchmarks/weight_sync_gpu.py [--json PATH] [--bucket-mib 1200] [--repeats 3]
    python benchmarks/weight_sync_gpu.py --device cpu --tiny     # smoke: same path, CPU tensors by value
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

from maspo_megatron.utils.ports import free_port  # noqa: E402

QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096,
                 tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0)
TINY = dict(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)


def _hf_config(shape: dict):
    import transformers

    return transformers.Qwen2Config(**shape)


def _fingerprint(tensor) -> list:
    """[sum, strided weighted sum] in float64: a permutation or a wrong tensor changes the second."""
    import torch

    flat = tensor.detach().reshape(-1)
    strided = flat[::997].double()
    weights = torch.arange(1, strided.numel() + 1, device=flat.device, dtype=torch.float64)
    return [float(flat.double().sum()), float((strided * weights).sum())]


# ---- the receiving process (the "engine") ----------------------------------------------------------
def _receiver(conn, shape: dict, device: str) -> None:
    import torch

    from maspo_megatron.rollout.weight_sync.flattened_bucket import load_payload

    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    with torch.device("meta"):
        import transformers

        model = transformers.Qwen2ForCausalLM(_hf_config(shape)).to(torch.bfloat16)
    model.to_empty(device=device)  # no init: every weight arrives through the sync
    model.requires_grad_(False)  # an engine's weights: copied into in place
    params = dict(model.named_parameters())
    conn.send(("ready", sorted(params)))
    while True:
        kind, body = conn.recv()
        if kind == "bucket":
            for name, tensor in load_payload(body):
                params[name].copy_(tensor)
            if cuda:
                torch.cuda.synchronize()  # the copies are done before the trainer may reuse the bucket
            conn.send("ok")
        elif kind == "scramble":
            with torch.no_grad():
                for param in params.values():
                    param.zero_()
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            conn.send("ok")
        elif kind == "check":
            extra = torch.cuda.max_memory_allocated() - base if cuda else float("nan")
            conn.send(({name: _fingerprint(p) for name, p in params.items()}, extra))
        elif kind == "baseline":
            conn.send(_baseline_copy(params, body, cuda))
        elif kind == "stop":
            conn.send("bye")
            return


def _baseline_copy(params: dict, repeats: int, cuda: bool) -> list:
    """Seconds of a per-tensor copy_ of a same-process clone of the state dict into the model."""
    import torch

    source = {name: p.detach().clone() for name, p in params.items()}
    times = []
    for _ in range(repeats + 1):  # the first pass is the warm-up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(source[name])
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del source
    return times[1:]


# ---- the trainer process ---------------------------------------------------------------------------
def _build_policy(shape: dict, device: str):
    import torch

    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models import WeightMap
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    dims = init_distributed(ParallelConfig(), seed=1)
    config, meta = build_model_config(_hf_config(shape), ModelConfig(dtype="bf16"), ParallelConfig())
    config.perform_initialization = False  # random values below, on the device (init on CPU takes minutes)
    with torch.device(device):
        chunk = gpt_model_provider(config, meta)
    chunk = chunk.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in chunk.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    return chunk, WeightMap.from_hf_config(_hf_config(shape), tp=1), dims


def _views_payload(bucket):
    """(buf, metadata) of a bucket whose tensors are views of one buffer (the iterator's): the buffer
    itself, no copy. Falls back to `flatten_tensors` when they are not."""
    import torch

    from maspo_megatron.rollout.weight_sync.flattened_bucket import FlattenedTensorMetadata, flatten_tensors

    storage = bucket[0][1].untyped_storage()
    if any(t.untyped_storage().data_ptr() != storage.data_ptr() for _, t in bucket):
        return flatten_tensors(bucket)
    buf = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))
    metadata = []
    for name, tensor in bucket:
        start = tensor.storage_offset() * tensor.element_size()
        nbytes = tensor.numel() * tensor.element_size()
        metadata.append(FlattenedTensorMetadata(name, tensor.shape, tensor.dtype, start, start + nbytes, nbytes))
    return buf, metadata


def _sync(chunk, wmap, dims, conn, bucket_bytes: int, device: str, mode: str) -> dict:
    """One sync, end to end; returns seconds, bytes and bucket count."""
    import torch

    from maspo_megatron.rollout.weight_sync.bucket_writer import BucketBuffers, iter_export_buckets
    from maspo_megatron.rollout.weight_sync.flattened_bucket import flatten_tensors, serialize_payload

    cuda = device == "cuda"
    buffers = BucketBuffers(bucket_bytes, device=torch.device(device))
    moved = buckets = 0
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for bucket in iter_export_buckets([chunk], wmap, dims, buffers, shared=False):
        buf, metadata = flatten_tensors(bucket, release=True) if mode == "flatten" else _views_payload(bucket)
        if cuda:  # the receiver reads on its own stream: this bucket's writes must have landed
            torch.cuda.current_stream().synchronize()
        conn.send(("bucket", serialize_payload(buf, metadata)))
        if _recv(conn) != "ok":
            raise RuntimeError("weight_sync_gpu: the receiver did not acknowledge a bucket")
        if cuda:  # the receiver dropped its IPC views: let torch free what it kept for them
            torch.cuda.ipc_collect()
        moved += sum(m.numel for m in metadata)
        buckets += 1
        del buf, metadata, bucket
    return {"seconds": time.perf_counter() - start, "bytes": moved, "buckets": buckets}


def _recv(conn, timeout_s: float = 600.0):
    """The receiver's next answer; raises (instead of waiting forever) when it died or went silent."""
    deadline = time.monotonic() + timeout_s
    while not conn.poll(1.0):
        if not _RECEIVER[0].is_alive():
            raise RuntimeError(f"weight_sync_gpu: the receiving process died (exit code {_RECEIVER[0].exitcode}); "
                               "its traceback is above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"weight_sync_gpu: no answer from the receiving process in {timeout_s:.0f} s")
    return conn.recv()


_RECEIVER: list = [None]  # the receiving process, for _recv's liveness check


def _expected_fingerprints(chunk, wmap, dims) -> dict:
    """The policy's HF tensors through the general export path (not the bucket iterator)."""
    import torch

    from maspo_megatron.rollout.weight_sync.hf_stream import megatron_hf_stream

    # cast to the engine's dtype first: the local spec's torch norms may be fp32 in a bf16 policy,
    # and the receiver's copy_ casts them the same way
    return {name: _fingerprint(tensor.to(torch.bfloat16)) for name, tensor, _ in megatron_hf_stream([chunk], wmap, dims)}


def _verify(conn, expected: dict, names: list) -> tuple[list, float]:
    """(HF tensors of the receiver's model whose fingerprint differs from the policy's export, names
    either side lacks included: [] when all arrived; the receiver's allocator peak above its model)."""
    conn.send(("check", None))
    got, receiver_extra = _recv(conn)
    bad = sorted(set(expected) ^ set(names))
    for name in sorted(set(expected) & set(names)):
        if not all(abs(a - b) <= 1e-6 * max(1.0, abs(b)) for a, b in zip(got[name], expected[name], strict=True)):
            bad.append(name)
    return bad, receiver_extra


def _measure(args, shape: dict) -> dict:
    import torch
    import torch.multiprocessing as mp

    device = args.device
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("weight_sync_gpu: --device cuda needs a GPU (use --device cpu --tiny for the smoke run)")
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    receiver = ctx.Process(target=_receiver, args=(child_conn, shape, device), daemon=True)
    receiver.start()  # builds the HF model while the policy is built here
    _RECEIVER[0] = receiver
    try:
        chunk, wmap, dims = _build_policy(shape, device)
        _, hf_names = _recv(conn)
        expected = _expected_fingerprints(chunk, wmap, dims)
        bucket_bytes = int(args.bucket_mib * 2**20)
        results = {}
        for mode in ("flatten", "views"):
            conn.send(("scramble", None))  # so that each mode's verification sees only its own delivery
            _recv(conn)
            _sync(chunk, wmap, dims, conn, bucket_bytes, device, mode)  # warm-up (allocator, IPC handles)
            if cuda:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            runs = [_sync(chunk, wmap, dims, conn, bucket_bytes, device, mode) for _ in range(args.repeats)]
            extra = (torch.cuda.max_memory_allocated() - base) if cuda else float("nan")
            mismatched, receiver_extra = _verify(conn, expected, hf_names)
            results[mode] = {"seconds": [r["seconds"] for r in runs], "bytes": runs[0]["bytes"],
                             "buckets": runs[0]["buckets"], "extra_bytes": extra, "receiver_extra_bytes": receiver_extra,
                             "verified": not mismatched,
                             "mismatched": mismatched[:10]}
        conn.send(("baseline", args.repeats))
        results["baseline"] = {"seconds": _recv(conn), "bytes": results["views"]["bytes"]}
        conn.send(("stop", None))
        _recv(conn)
    finally:
        receiver.join(timeout=30)
        if receiver.is_alive():
            receiver.kill()
    results["bucket_bytes"] = bucket_bytes
    results["params"] = sum(p.numel() for p in chunk.parameters())
    return results


def _rows(results: dict, shape_name: str, device: str) -> list[dict]:
    bucket = results["bucket_bytes"]
    floor = min(results["baseline"]["seconds"])
    rows = []
    via = "CUDA IPC" if device == "cuda" else "pipe by value (CPU smoke, no IPC)"
    labels = {"flatten": f"bucket iterator -> fresh flattened buffer (tensor transport) -> {via} -> HF model",
              "views": f"bucket iterator's buffer as the flattened bucket (no copy) -> {via} -> HF model",
              "baseline": "baseline: per-tensor copy_ of the same state dict, one process"}
    for mode in ("flatten", "views", "baseline"):
        res = results[mode]
        best = min(res["seconds"])
        rows.append({
            "case": f"{labels[mode]}; {shape_name}, {results['params'] / 1e9:.2f} B params bf16, {device}",
            "s_per_sync_best": best, "s_per_sync_median": statistics.median(res["seconds"]),
            "GB": res["bytes"] / 1e9, "GB_per_s": res["bytes"] / best / 1e9, "vs_copy_floor": best / floor,
            "buckets": res.get("buckets", ""), "bucket_MiB": bucket / 2**20,
            "extra_GiB": res.get("extra_bytes", float("nan")) / 2**30 if mode != "baseline" else "",
            "extra_in_buckets": res.get("extra_bytes", float("nan")) / bucket if mode != "baseline" else "",
            "receiver_extra_GiB": res.get("receiver_extra_bytes", float("nan")) / 2**30 if mode != "baseline" else "",
            "verified": res.get("verified", ""),
        })
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny Qwen2 shape (smoke run)")
    parser.add_argument("--bucket-mib", type=float, default=None,
                        help="bucket size (default 1200 MiB: the 1.09 GB embedding fits one bucket; tiny: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed syncs per case, after one warm-up")
    parser.add_argument("--json", default=None, help="also write the rows and raw timings to this file")
    args = parser.parse_args(argv)
    if args.bucket_mib is None:
        args.bucket_mib = 1.0 if args.tiny else 1200.0
    shape_name, shape = ("tiny Qwen2", TINY) if args.tiny else ("Qwen2.5-7B shape", QWEN25_7B)
    results = _measure(args, shape)
    rows = _rows(results, shape_name, args.device)
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "raw": results}, indent=2, default=str) + "\n")
    if not all(results[m]["verified"] for m in ("flatten", "views")):
        bad = {m: results[m]["mismatched"] for m in ("flatten", "views")}
        raise SystemExit(f"weight_sync_gpu: the receiver's weights do not match the policy's export: {bad}")
    return rows


if __name__ == "__main__":
    main()
