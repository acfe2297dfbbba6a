"""Checkpoint conversion throughput and peak memory, streamed converters vs load-everything.

A synthetic Llama-7B-shaped checkpoint (bf16, a few layers, >= 3 GB; --quick: ~70 MB) is written
as HF safetensors shards, then, each in a fresh process so peak RSS is its own:
  baseline   plain safetensors: load every shard into one dict, then save it again (same shard cap)
  hf->meg    tools' HF -> Megatron torch_dist conversion (maspo_megatron.checkpoint.convert)
  meg->hf    Megatron torch_dist -> HF safetensors conversion
Cases alternate, --repeat times each (default 3); the fastest run of each case counts (kernel
write speed on a shared VM swings 2-5x between identical runs), and every run's seconds are
reported too. Reported: GB/s and its ratio to the baseline; peak RSS (the worker's own VmHWM,
largest over the repeats) as a multiple of the largest input shard and of the model size, and
the same for the RSS above the process's RSS after its imports. Everything is written under
--workdir (default /tmp; e.g. /dev/shm to leave the disk out) and deleted after; the table
names the file system used.

    flock /tmp/maspo_heavy.lock .venv/bin/python benchmarks/convert.py          # full (>= 3 GB)
    .venv/bin/python benchmarks/convert.py --quick                              # smoke size
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))

# Llama-2-7B widths; layers are few so the file stays a few GB
FULL = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
            num_hidden_layers=7, shard_bytes=10**9)
QUICK = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=8, num_key_value_heads=8, vocab_size=4096,
             num_hidden_layers=2, shard_bytes=16 * 10**6)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's own peak RSS (VmHWM: anonymous + mapped file pages). Not getrusage's
    ru_maxrss, which keeps the parent's RSS across the (v)fork + exec that started the worker."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status: no VmHWM line")


def _fs_type(path: Path) -> str:
    best, fstype = "", "?"
    with open("/proc/mounts") as handle:
        for line in handle:
            mount, kind = line.split()[1], line.split()[2]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    return f"{path} ({fstype})"


def _write_synthetic(hf_dir: Path, shape: dict) -> None:
    import torch
    import transformers

    from maspo_megatron.checkpoint.hf_writer import ShardedSafetensorsWriter
    from maspo_megatron.models import WeightMap

    hf_dir.mkdir(parents=True)
    config = transformers.LlamaConfig(**{k: v for k, v in shape.items() if k != "shard_bytes"},
                                      tie_word_embeddings=False, max_position_embeddings=4096)
    config.save_pretrained(hf_dir)
    wmap = WeightMap.from_hf_config(config)
    entries = []
    for mt in wmap.megatron_tensors():
        names = [n.format(i=mt.layer) for n in mt.rule.hf]
        entries += [(n, s, torch.bfloat16) for n, s in zip(names, wmap.hf_shapes(mt.rule), strict=True)]
    writer = ShardedSafetensorsWriter(hf_dir, entries, shape["shard_bytes"])
    generator = torch.Generator().manual_seed(0)
    for name, tensor_shape, dtype in entries:
        writer.add(name, torch.randn(tensor_shape, generator=generator).to(dtype))
    writer.finish()
    writer.write_index()


def _worker(mode: str, src: str, dst: str, shard_bytes: int) -> dict:
    """Runs one conversion in this process; returns seconds and RSS figures."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch  # noqa: F401  (imports are not part of the timed work)
    from safetensors.torch import load_file, save_file

    import maspo_megatron.models.config_builder  # noqa: F401  (Megatron's transformer modules: one-time import cost)
    from maspo_megatron.checkpoint.convert import hf_to_megatron, megatron_to_hf

    base_rss = _rss_bytes()
    start = time.perf_counter()
    if mode == "baseline":
        state = {}
        for shard in sorted(Path(src).glob("*.safetensors")):
            state.update(load_file(shard))
        Path(dst).mkdir()
        part, size, k = {}, 0, 0
        for name, tensor in state.items():
            nbytes = tensor.numel() * tensor.element_size()
            if part and size + nbytes > shard_bytes:
                save_file(part, Path(dst) / f"model-{k:05d}.safetensors")
                part, size, k = {}, 0, k + 1
            part[name], size = tensor, size + nbytes
        save_file(part, Path(dst) / f"model-{k:05d}.safetensors")
    elif mode == "hf->meg":
        hf_to_megatron(src, dst, tp=1, pp=1, progress=False)
    elif mode == "meg->hf":
        megatron_to_hf(src, dst, max_shard_bytes=shard_bytes, progress=False)
    else:
        raise ValueError(f"--worker: unknown mode {mode!r}")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss": _peak_rss_bytes(), "base_rss": base_rss}


def _run_worker(mode: str, src: Path, dst: Path, shard_bytes: int) -> dict:
    # every case starts with no dirty pages queued by the one before (untimed): otherwise a run
    # pays for writing back its predecessor's output
    os.sync()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, __file__, "--worker", mode, str(src), str(dst), str(shard_bytes)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _dir_bytes(path: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in path.glob(f"*{suffix}"))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~70 MB model instead of >= 3 GB")
    parser.add_argument("--workdir", default=tempfile.gettempdir(), help="where the checkpoints are written (then deleted)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (alternating); the fastest counts")
    parser.add_argument("--worker", nargs=4, metavar=("MODE", "SRC", "DST", "SHARD_BYTES"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        mode, src, dst, shard_bytes = args.worker
        print(json.dumps(_worker(mode, src, dst, int(shard_bytes))))
        return []
    shape = QUICK if args.quick else FULL
    root = Path(tempfile.mkdtemp(prefix="maspo_bench_convert_", dir=args.workdir))
    try:
        hf = root / "hf"
        _write_synthetic(hf, shape)
        model_bytes = _dir_bytes(hf, ".safetensors")
        largest_shard = max(p.stat().st_size for p in hf.glob("*.safetensors"))
        # cases alternate and repeat; the fastest run of each counts (shared machines are noisy),
        # the largest peak RSS counts
        runs: dict[str, list[dict]] = {"baseline": [], "hf->meg": [], "meg->hf": []}
        for _ in range(args.repeat):
            runs["baseline"].append(_run_worker("baseline", hf, root / "resaved", shape["shard_bytes"]))
            shutil.rmtree(root / "resaved")
            shutil.rmtree(root / "meg", ignore_errors=True)
            runs["hf->meg"].append(_run_worker("hf->meg", hf, root / "meg", shape["shard_bytes"]))
            shutil.rmtree(root / "hf2", ignore_errors=True)
            runs["meg->hf"].append(_run_worker("meg->hf", root / "meg", root / "hf2", shape["shard_bytes"]))
        results = {case: {"seconds": min(r["seconds"] for r in rs), "peak_rss": max(r["peak_rss"] for r in rs),
                          "base_rss": min(r["base_rss"] for r in rs), "all_seconds": [r["seconds"] for r in rs]}
                   for case, rs in runs.items()}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    base_gbps = model_bytes / 1e9 / results["baseline"]["seconds"]
    rows = []
    for case, res in results.items():
        gbps = model_bytes / 1e9 / res["seconds"]
        rows.append({
            "benchmark": "convert", "case": case, "model_gb": round(model_bytes / 1e9, 3),
            "largest_shard_gb": round(largest_shard / 1e9, 3), "seconds": round(res["seconds"], 2),
            "gb_per_s": round(gbps, 3), "throughput_vs_baseline": round(gbps / base_gbps, 3),
            "peak_rss_gb": round(res["peak_rss"] / 1e9, 3),
            "peak_rss_over_largest_shard": round(res["peak_rss"] / largest_shard, 2),
            # the same without the interpreter + torch/Megatron imports (what the conversion itself holds)
            "work_rss_over_largest_shard": round((res["peak_rss"] - res["base_rss"]) / largest_shard, 2),
            "peak_rss_over_model": round(res["peak_rss"] / model_bytes, 2),
            "rss_after_imports_gb": round(res["base_rss"] / 1e9, 3),
            "all_seconds": " ".join(f"{x:.2f}" for x in res["all_seconds"]),
            "workdir": _fs_type(Path(args.workdir).resolve()),
        })
    _print_table(rows)
    return rows


def _print_table(rows: list[dict]) -> None:
    cols = ["case", "model_gb", "seconds", "gb_per_s", "throughput_vs_baseline", "peak_rss_gb",
            "peak_rss_over_largest_shard", "work_rss_over_largest_shard", "peak_rss_over_model", "rss_after_imports_gb",
            "all_seconds"]
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    print(f"workdir: {rows[0]['workdir']}, largest shard {rows[0]['largest_shard_gb']} GB")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for row in rows:
        print("  ".join(str(row[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))


if __name__ == "__main__":
    main()
