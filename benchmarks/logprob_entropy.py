"""Fused vocab-parallel log-prob + entropy vs the usual ways, forward + backward, on CPU or one GPU.

    flock /tmp/maspo_heavy.lock .venv/bin/python benchmarks/logprob_entropy.py          # full (~15-20 GB)
    .venv/bin/python benchmarks/logprob_entropy.py --quick                              # smoke size
    python benchmarks/logprob_entropy.py --device cuda [--json PATH]                    # one GPU, ~1 min

GPU mode (bf16 logits [T, V], TP 1, T=16,384 and V=151,936 unless --tokens/--vocabs say otherwise;
loss = sum(w1 * log_prob + w2 * entropy), one process):
  triton         vocab_parallel_logprobs_entropy(kernel="triton")
  torch_chunked  vocab_parallel_logprobs_entropy(kernel="torch") (the CPU implementation, on CUDA)
  plain_fp32     log_softmax(logits.float()) + gather + entropy
Reported: median of --reps CUDA-event timings after warm-up, of the forward alone (no_grad, the
log-prob pass) and of forward + backward; extra peak memory = torch.cuda.max_memory_allocated
minus what was allocated before (logits included) minus the returned gradient; max |log_prob|
and |entropy| difference against plain_fp32; and the memory floor: (read the logits once + write
the gradient once) / the device-to-device copy bandwidth measured in the same run (bytes read +
written per second).

Methods (fp32 logits [T, V/TP] per TP rank; loss = sum(w1 * log_prob + w2 * entropy)):
  fused       maspo_megatron.parallel.vocab_parallel_logprobs_entropy
  a_plain     (a) full-vocab log_softmax + gather + entropy (at TP > 1 the shards are first
              all-gathered into [T, V], as a non-vocab-parallel implementation must)
  b_megatron  (b) Megatron's vocab_parallel_cross_entropy (on a clone: it works in place) plus a
              separate vocab-parallel entropy pass written with autograd ops
Each (method, V, TP) cell runs in fresh processes (one per TP rank, gloo), so that the peak RSS
(ru_maxrss, max over ranks) is that method's own. Reported: median time of `--reps` runs and
peak RSS, with ratios against a_plain measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from maspo_megatron.utils.ports import free_port

METHODS = ("a_plain", "b_megatron", "fused")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _plain(logits, target, w_lp, w_ent, tp_group):
    import torch
    import torch.distributed.nn.functional as dist_fn

    full = logits
    if tp_group is not None:
        full = torch.cat(dist_fn.all_gather(logits, group=tp_group), dim=-1)
    log_probs = torch.log_softmax(full, dim=-1)
    log_prob = log_probs.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_prob, entropy


def _megatron(logits, target, w_lp, w_ent, tp_group):
    import torch.distributed as dist
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    # separate entropy pass (vocab-parallel: all-reduce forward, identity backward)
    row_max = logits.detach().max(dim=-1).values
    if tp_group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=tp_group)
    shifted = logits - row_max[:, None]
    exp_shifted = shifted.exp()
    sum_exp = reduce_from_tensor_model_parallel_region(exp_shifted.sum(-1))
    sum_exp_shifted = reduce_from_tensor_model_parallel_region((exp_shifted * shifted).sum(-1))
    entropy = sum_exp.log() - sum_exp_shifted / sum_exp
    # Megatron's CE exponentiates its input in place: it gets a clone
    loss = vocab_parallel_cross_entropy(logits.clone()[:, None], target[:, None])[:, 0]
    return -loss, entropy


def _fused(logits, target, w_lp, w_ent, tp_group):
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    return vocab_parallel_logprobs_entropy(logits, target, tp_group)


def _worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    tp_group = None
    if world > 1 or args.method == "b_megatron":
        from maspo_megatron.config.parallel import ParallelConfig
        from maspo_megatron.parallel import init_distributed

        dims = init_distributed(ParallelConfig(tp=world), seed=0)
        tp_group = dims.tp_group if world > 1 else None
    gen = torch.Generator().manual_seed(0)
    vocab_local = args.vocab // world
    target = torch.randint(0, args.vocab, (args.tokens,), generator=gen)
    w_lp, w_ent = torch.randn(args.tokens, generator=gen), torch.randn(args.tokens, generator=gen)
    fn = {"a_plain": _plain, "b_megatron": _megatron, "fused": _fused}[args.method]
    times = []
    for _ in range(args.reps):
        logits = (torch.randn(args.tokens, vocab_local, generator=gen) * 2).requires_grad_()
        start = time.perf_counter()
        log_prob, entropy = fn(logits, target, w_lp, w_ent, tp_group)
        ((log_prob * w_lp).sum() + (entropy * w_ent).sum()).backward()
        times.append(time.perf_counter() - start)
        del logits, log_prob, entropy
    print("RESULT " + json.dumps({"rank": rank, "times_s": times, "peak_rss_gb": _peak_rss_gb()}), flush=True)
    os._exit(0)  # skip gloo teardown


def _run_cell(method: str, vocab: int, tp: int, tokens: int, reps: int, threads: int, timeout_s: float) -> dict:
    port = free_port()
    procs = []
    for rank in range(tp):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(tp), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                   PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")])))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--vocab", str(vocab),
               "--tokens", str(tokens), "--reps", str(reps), "--threads", str(threads)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      start_new_session=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise RuntimeError(f"{method} V={vocab} TP={tp}: timed out after {timeout_s} s") from None
        lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{method} V={vocab} TP={tp} failed (exit {proc.returncode}):\n{err[-3000:]}")
        results.append(json.loads(lines[-1][len("RESULT "):]))
    # a step ends when the slowest rank ends: per repetition, the max over ranks
    per_rep = [max(r["times_s"][i] for r in results) for i in range(reps)]
    return {"time_s": statistics.median(per_rep), "peak_rss_gb": max(r["peak_rss_gb"] for r in results)}


# ---- GPU mode ----------------------------------------------------------------------------------
def _cuda_median_ms(step, reps: int, warmup: int, before=None) -> float:
    """Median CUDA-event time of step() over `reps` calls after `warmup` calls; before() runs untimed."""
    import torch

    times = []
    for index in range(warmup + reps):
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        if index >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _copy_bandwidth_bytes_per_s(nbytes: int, reps: int = 10) -> float:
    """Device-to-device copy bandwidth, counting the bytes read plus the bytes written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    return 2 * nbytes / (_cuda_median_ms(lambda: dst.copy_(src), reps, warmup=2) * 1e-3)


def _gpu_cell(name: str, fn, leaves: list, w_lp, w_ent, reps: int, warmup: int, reference) -> dict:
    """fn() -> (log_prob, entropy) from the `leaves` (tensors requiring grad): times, extra peak memory."""
    import torch

    def forward_only():
        with torch.no_grad():
            fn()

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    def step():
        log_prob, entropy = fn()
        ((log_prob * w_lp).sum() + (entropy * w_ent).sum()).backward()

    forward_ms = _cuda_median_ms(forward_only, reps, warmup)
    step_ms = _cuda_median_ms(step, reps, warmup, before=clear_grads)
    clear_grads()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    allocated_before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    grad_bytes = sum(leaf.grad.numel() * leaf.grad.element_size() for leaf in leaves)
    extra_bytes = torch.cuda.max_memory_allocated() - allocated_before - grad_bytes
    with torch.no_grad():
        log_prob, entropy = fn()
    cell = {"method": name, "fwd_ms": forward_ms, "fwd_bwd_ms": step_ms, "extra_gib": extra_bytes / 2**30,
            "log_prob": log_prob, "entropy": entropy}
    if reference is not None:
        cell["max_dlogprob"] = float((log_prob - reference["log_prob"]).abs().max())
        cell["max_dentropy"] = float((entropy - reference["entropy"]).abs().max())
    clear_grads()
    torch.cuda.empty_cache()
    return cell


def _gpu_rows(cells: list, reference: dict, logits_bytes: int, floor_ms, **shape) -> list[dict]:
    rows = []
    for cell in cells:
        row = dict(shape, dtype="bf16", method=cell["method"], fwd_ms=round(cell["fwd_ms"], 3),
                   fwd_bwd_ms=round(cell["fwd_bwd_ms"], 3),
                   speedup_vs_plain=round(reference["fwd_bwd_ms"] / cell["fwd_bwd_ms"], 2))
        if floor_ms is not None:
            row["x_floor"] = round(cell["fwd_bwd_ms"] / floor_ms, 2)
        rows.append(dict(row, extra_gib=round(cell["extra_gib"], 3),
                         extra_vs_logits=round(cell["extra_gib"] * 2**30 / logits_bytes, 3),
                         max_dlogprob_vs_plain=cell.get("max_dlogprob", 0.0),
                         max_dentropy_vs_plain=cell.get("max_dentropy", 0.0)))
    return rows


def _gpu_kernel_configs() -> dict:
    from maspo_megatron.parallel import logprob_triton

    configs = {}
    for name in ("_shard_statistics_kernel", "_shard_gradient_kernel"):
        tuner = getattr(logprob_triton, name)
        configs[name] = str(getattr(tuner, "best_config", None))
        timings = getattr(tuner, "configs_timings", None) or {}  # the autotuner's last sweep (ms)
        configs[name + "_sweep_ms"] = {str(config): [round(t, 3) for t in times] if isinstance(times, list)
                                       else times for config, times in timings.items()}
    return configs


def _gpu_logits_table(tokens: int, vocab: int, reps: int, warmup: int, gen) -> dict:
    """bf16 logits[T, V] in: Triton vs torch chunked vs plain fp32, plus the memory floor."""
    import torch

    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    logits = (torch.randn(tokens, vocab, generator=gen, device="cuda") * 2).to(torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=gen, device="cuda")
    w_lp, w_ent = torch.randn(tokens, generator=gen, device="cuda"), torch.randn(tokens, generator=gen, device="cuda")
    logits_bytes = logits.numel() * logits.element_size()
    bandwidth = _copy_bandwidth_bytes_per_s(min(logits_bytes, 4 * 2**30))
    torch.cuda.empty_cache()  # the copy's buffers
    floor_ms = 2 * logits_bytes / bandwidth * 1e3  # read the logits once + write a same-dtype gradient once
    methods = {"triton": lambda: vocab_parallel_logprobs_entropy(logits, target, None, kernel="triton"),
               "torch_chunked": lambda: vocab_parallel_logprobs_entropy(logits, target, None, kernel="torch"),
               "plain_fp32": lambda: _plain(logits.float(), target, None, None, None)}
    reference = _gpu_cell("plain_fp32", methods["plain_fp32"], [logits], w_lp, w_ent, reps, warmup, None)
    cells = [_gpu_cell(name, methods[name], [logits], w_lp, w_ent, reps, warmup, reference)
             for name in ("triton", "torch_chunked")] + [reference]
    return {"rows": _gpu_rows(cells, reference, logits_bytes, floor_ms, T=tokens, V=vocab),
            "logits_gib": logits_bytes / 2**30, "copy_tb_per_s": bandwidth / 1e12, "floor_ms": floor_ms}


def _gpu_fused_table(tokens: int, vocab: int, hidden_size: int, reps: int, warmup: int, gen) -> list[dict]:
    """bf16 hidden[T, H] and output weight[V, H] in: fused output layer vs matmul + Triton vs matmul + plain."""
    import torch

    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy
    from maspo_megatron.parallel.fused_output import fused_output_logprobs_entropy

    hidden = torch.randn(tokens, hidden_size, generator=gen, device="cuda").to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen, device="cuda") * 2 / hidden_size**0.5).to(
        torch.bfloat16).requires_grad_()
    target = torch.randint(0, vocab, (tokens,), generator=gen, device="cuda")
    w_lp, w_ent = torch.randn(tokens, generator=gen, device="cuda"), torch.randn(tokens, generator=gen, device="cuda")
    methods = {
        "fused_output": lambda: fused_output_logprobs_entropy(hidden, weight, target, None, kernel="triton"),
        "matmul+triton": lambda: vocab_parallel_logprobs_entropy(hidden @ weight.t(), target, None, kernel="triton"),
        "matmul+plain_fp32": lambda: _plain((hidden @ weight.t()).float(), target, None, None, None)}
    leaves = [hidden, weight]
    reference = _gpu_cell("matmul+plain_fp32", methods["matmul+plain_fp32"], leaves, w_lp, w_ent, reps, warmup, None)
    cells = [_gpu_cell(name, methods[name], leaves, w_lp, w_ent, reps, warmup, reference)
             for name in ("fused_output", "matmul+triton")] + [reference]
    return _gpu_rows(cells, reference, tokens * vocab * 2, None, T=tokens, V=vocab, H=hidden_size)


def gpu_main(tokens: int, vocab: int, hidden_size: int, reps: int, warmup: int) -> dict:
    """The GPU tables (logits in; hidden states in, when hidden_size > 0) and the floor."""
    import torch

    gen = torch.Generator(device="cuda").manual_seed(0)
    result = _gpu_logits_table(tokens, vocab, reps, warmup, gen)
    torch.cuda.empty_cache()
    result["triton_configs"] = _gpu_kernel_configs()
    if hidden_size > 0:
        result["fused_rows"] = _gpu_fused_table(tokens, vocab, hidden_size, reps, warmup, gen)
    return dict(result, device=torch.cuda.get_device_name(), torch=torch.__version__, reps=reps, warmup=warmup)


def _print_gpu(result: dict) -> None:
    _print_table(result["rows"], tuple(result["rows"][0]))
    print(f"\n{result['device']}, torch {result['torch']}; logits {result['logits_gib']:.2f} GiB bf16; "
          f"device-to-device copy {result['copy_tb_per_s']:.2f} TB/s (read + write); floor (read logits once + "
          f"write the gradient once) {result['floor_ms']:.2f} ms; median of {result['reps']} after "
          f"{result['warmup']} warm-up; Triton configs {result['triton_configs']}")
    ours = next(row for row in result["rows"] if row["method"] == "triton")
    print(f"triton vs the issue's targets: {ours['fwd_bwd_ms']} ms (<= 7), {ours['speedup_vs_plain']}x plain "
          f"(>= 10), extra memory {ours['extra_vs_logits']}x the logits (<= 1.1), {ours['x_floor']}x the floor (<= 3)")
    if result.get("fused_rows"):
        print("\nOutput layer included (hidden[T, H] and weight[V, H] in, their gradients out; "
              "extra_vs_logits: against a bf16 [T, V]):")
        _print_table(result["fused_rows"], tuple(result["fused_rows"][0]))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke size (T=256, V=32000/8192)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--json", type=str, default=None, help="also write the rows (GPU mode: and the floor) here")
    parser.add_argument("--hidden", type=int, default=1536,
                        help="GPU mode: hidden size of the fused output-layer table (0: skip it)")
    parser.add_argument("--warmup", type=int, default=3, help="GPU mode: untimed calls first (Triton autotunes)")
    parser.add_argument("--tokens", type=int, default=None, help="default 4096 (cpu), 16384 (cuda)")
    parser.add_argument("--vocabs", type=str, default="151936,32000", help="cuda: the first one only")
    parser.add_argument("--tps", type=str, default="1,2")
    parser.add_argument("--reps", type=int, default=None, help="default 3 (cpu), 10 (cuda)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: 2 / TP)")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args)
        return []
    if args.device == "cuda":
        result = gpu_main(args.tokens or 16384, int(args.vocabs.split(",")[0]), args.hidden, args.reps or 10,
                          args.warmup)
        _print_gpu(result)
        _write_json(args.json, result)
        return result["rows"] + result.get("fused_rows", [])
    args.tokens, args.reps = args.tokens or 4096, args.reps or 3
    if args.quick:
        args.tokens, args.vocabs, args.reps = 256, "32000,8192", 2
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for tp in [int(t) for t in args.tps.split(",")]:
            threads = args.threads or max(1, 2 // tp)
            cells = {}
            for method in METHODS:
                try:
                    cells[method] = _run_cell(method, vocab, tp, args.tokens, args.reps, threads, args.timeout_s)
                    print(f"# V={vocab} TP={tp} {method}: {cells[method]}", file=sys.stderr, flush=True)
                except RuntimeError as error:  # e.g. a baseline killed for memory: report, keep going
                    lines = str(error).splitlines()
                    print(f"# {lines[0]} ... {lines[-1] if len(lines) > 1 else ''}", file=sys.stderr)
                    cells[method] = {"time_s": math.nan, "peak_rss_gb": math.nan}
            base = cells["a_plain"]
            for method, cell in cells.items():
                rows.append({"T": args.tokens, "V": vocab, "TP": tp, "method": method,
                             "time_s": round(cell["time_s"], 3), "peak_rss_gb": round(cell["peak_rss_gb"], 2),
                             "time_vs_a": round(cell["time_s"] / base["time_s"], 3),
                             "mem_vs_a": round(cell["peak_rss_gb"] / base["peak_rss_gb"], 3)})
    _print_table(rows, ("T", "V", "TP", "method", "time_s", "peak_rss_gb", "time_vs_a", "mem_vs_a"))
    _write_json(args.json, rows)
    return rows


def _write_json(path, payload) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=1)


def _print_table(rows: list[dict], header: tuple) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[key]) for key in header) + " |")


if __name__ == "__main__":
    main()
