"""Policy forward + backward on one GPU: Megatron-Core with the project's packed spec vs HF transformers.

    python benchmarks/policy_step_gpu.py [--json PATH]          # CUDA only; ~1-2 min on an H200
    python benchmarks/policy_step_gpu.py --tiny --allow-cpu     # smoke test of the code path on a CPU

A Qwen2.5-1.5B-shaped policy (random weights, bf16, tied embeddings) on packed rows of
`--row-tokens` (default 4,096 and 16,384) made of samples of `--sample-tokens` (512: 8 and 32
samples per row). The loss side is the trainer's: logits into the fused
`vocab_parallel_logprobs_entropy` (loss = -mean(log_prob * advantage) - 0.01 mean(entropy)).

Rows (each timed after warm-up, the same batch for every method):
  ours_packed          build_model_config + gpt_model_provider(backend="packed") on the GPU,
                       Float16Module(fp32_output=False): bf16 logits into the fused log-prob; ONE
                       row [1, T] with THD packed_seq_params (cu_seqlens on the CPU)
  ours_packed_fp32     the same with Float16Module's default fp32_output=True: the [T, V] logits
                       are upcast to fp32 (megatron/core/transformer/module.py:453 default, 490-495 the cast, in 0.16.1)
  ours_packed_cu_gpu   ours_packed with cu_seqlens on the GPU (Megatron's unfused THD RoPE then
                       syncs on `.tolist()` twice per layer)
  hf_sdpa_packed       Qwen2ForCausalLM(attn_implementation="sdpa") on the same ONE row with
                       position_ids restarting per sample: transformers 5 detects the packing
                       (masking_utils.find_packed_sequence_indices) and builds a block-diagonal
                       causal mask, so SDPA runs with a dense [T, T] boolean mask
  hf_sdpa_rows         the same model, one sample per row ([T/512, 512], plain causal SDPA, flash
                       kernel): the same tokens, HF's best case (equal-length samples, no padding)
MFU = (6 N + 6 L H S) tokens/s / 989 TFLOP/s (GPU_NOTES.md), N parameters, L layers, H hidden,
S the sample length (the attention each token actually does). Peak = max allocated during the
steps minus what was allocated before them (activations, logits, gradients; not the weights).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16
QWEN25_1_5B = dict(hidden=1536, ffn=8960, layers=28, heads=12, kv_heads=2, vocab=151936)
TINY = dict(hidden=64, ffn=128, layers=2, heads=4, kv_heads=2, vocab=1024)


def hf_config(shape: dict):
    import transformers

    return transformers.Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True,
        use_sliding_window=False, hidden_act="silu", attn_implementation="sdpa")


def make_batch(row_tokens: int, sample_tokens: int, vocab: int, device) -> dict:
    """tokens/positions [1, T] (positions restart per sample), cu_seqlens[k+1] (CPU int32), target/advantage [T]."""
    if row_tokens % sample_tokens:
        raise ValueError(f"--row-tokens: {row_tokens} is not a multiple of --sample-tokens {sample_tokens}")
    gen = torch.Generator().manual_seed(row_tokens)
    samples = row_tokens // sample_tokens
    tokens = torch.randint(0, vocab, (1, row_tokens), generator=gen)
    positions = torch.arange(sample_tokens).repeat(samples)[None]
    return {
        "tokens": tokens.to(device), "positions": positions.to(device), "samples": samples,
        "cu_seqlens": torch.arange(0, row_tokens + 1, sample_tokens, dtype=torch.int32),
        "target": torch.randint(0, vocab, (row_tokens,), generator=gen).to(device),
        "advantage": torch.randn(row_tokens, generator=gen).to(device),
    }


def policy_loss(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """logits[T, V] (any float dtype, never upcast here) -> scalar loss through the fused log-prob."""
    from maspo_megatron.parallel import vocab_parallel_logprobs_entropy

    log_prob, entropy = vocab_parallel_logprobs_entropy(logits, batch["target"], None)
    return -(log_prob * batch["advantage"]).mean() - 0.01 * entropy.mean()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step, device, warmup: int, reps: int) -> dict:
    """Median seconds of `step()` (fwd + bwd) and the peak extra memory of the timed steps."""
    for _ in range(warmup):
        step()
    _sync(device)
    gc.collect()
    before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if device.type == "cuda" else float("nan")
    return {"step_s": sorted(times)[len(times) // 2], "peak_extra_gib": peak}


def build_ours(shape: dict, device):
    """(Float16Module-wrapped GPTModel on `device` with the packed spec, its parameter count)."""
    from megatron.core.transformer.module import Float16Module

    from maspo_megatron.config import ModelConfig, ParallelConfig
    from maspo_megatron.models.config_builder import build_model_config
    from maspo_megatron.models.provider import gpt_model_provider
    from maspo_megatron.parallel import init_distributed

    init_distributed(ParallelConfig(), seed=1)
    config, meta = build_model_config(hf_config(shape), ModelConfig(dtype="bf16"), ParallelConfig())
    model = gpt_model_provider(config, meta, backend="packed").to(device)  # torch norms are built on the CPU
    return Float16Module(config, model), sum(p.numel() for p in model.parameters())


def ours_step(model, batch: dict, *, fp32_output: bool, cu_device):
    from maspo_megatron.models.packed_attention import thd_packed_seq_params

    params = thd_packed_seq_params(batch["cu_seqlens"].to(cu_device))

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(batch["tokens"], batch["positions"], None, packed_seq_params=params, fp32_output=fp32_output)
        policy_loss(logits[0], batch).backward()
    return step


def logits_dtypes(model, batch: dict) -> dict:
    """{fp32_output: dtype of the logits the loss receives} (Float16Module upcasts unless told not to)."""
    from maspo_megatron.models.packed_attention import thd_packed_seq_params

    params = thd_packed_seq_params(batch["cu_seqlens"])
    with torch.no_grad():
        return {str(flag): str(model(batch["tokens"], batch["positions"], None, packed_seq_params=params,
                                     fp32_output=flag).dtype) for flag in (False, True)}


def build_hf(shape: dict, device):
    import transformers

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = transformers.Qwen2ForCausalLM(hf_config(shape))
    finally:
        torch.set_default_dtype(previous)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"HF baseline: attention is {model.config._attn_implementation!r}, not sdpa")
    model.train()
    return model


def hf_packing_supported() -> bool:
    import transformers.masking_utils as masking

    return hasattr(masking, "find_packed_sequence_indices")


def hf_step(model, batch: dict, *, packed: bool):
    tokens, positions = batch["tokens"], batch["positions"]
    if not packed:  # one sample per row: [k, S]
        tokens, positions = tokens.view(batch["samples"], -1), positions.view(batch["samples"], -1)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, position_ids=positions, use_cache=False).logits
        policy_loss(logits.reshape(-1, logits.shape[-1]), batch).backward()
    return step


def hf_packing_error(model, batch: dict) -> float:
    """max |logits(packed row) - logits(one sample per row)| / max |logits|: ~bf16 noise when HF packs right."""
    with torch.no_grad():
        packed = model(input_ids=batch["tokens"], position_ids=batch["positions"], use_cache=False).logits
        rows = model(input_ids=batch["tokens"].view(batch["samples"], -1),
                     position_ids=batch["positions"].view(batch["samples"], -1), use_cache=False).logits
        packed, rows = packed.reshape(rows.shape).float(), rows.float()
        return float((packed - rows).abs().max() / rows.abs().max())


def _row(method: str, row_tokens: int, sample_tokens: int, result: dict, params: int, shape: dict) -> dict:
    tokens_per_s = row_tokens / result["step_s"]
    flops_per_token = 6 * params + 6 * shape["layers"] * shape["hidden"] * sample_tokens
    return {"method": method, "row_tokens": row_tokens, "sample_tokens": sample_tokens,
            "step_ms": 1e3 * result["step_s"], "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * flops_per_token / (PEAK_TFLOPS * 1e12), "peak_extra_gib": result["peak_extra_gib"]}


def _release(*objects) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else QWEN25_1_5B
    rows = []
    batches = {t: make_batch(t, args.sample_tokens, shape["vocab"], device) for t in args.row_tokens}
    model, params = build_ours(shape, device)
    args.logits_dtype = logits_dtypes(model, batches[min(batches)])
    print(f"  ours: logits dtype by Float16Module fp32_output: {args.logits_dtype}", flush=True)
    for row_tokens, batch in batches.items():
        for method, fp32_output, cu_device in (("ours_packed", False, "cpu"), ("ours_packed_fp32", True, "cpu"),
                                               ("ours_packed_cu_gpu", False, device)):
            if method == "ours_packed_cu_gpu" and (device.type != "cuda" or row_tokens != min(batches)):
                continue
            result = measure(ours_step(model, batch, fp32_output=fp32_output, cu_device=cu_device),
                             device, args.warmup, args.reps)
            rows.append(_row(method, row_tokens, args.sample_tokens, result, params, shape))
            print(f"  {method} T={row_tokens}: {rows[-1]['step_ms']:.1f} ms", flush=True)
    _release(model)
    model = build_hf(shape, device)
    modes = [("hf_sdpa_packed", True)] if hf_packing_supported() else []
    if modes:
        error = hf_packing_error(model, batches[min(batches)])
        print(f"  HF packed row vs one sample per row: relative logit difference {error:.2e}", flush=True)
        if error > 5e-2:  # bf16 noise is ~1e-2; a leak across samples is O(1)
            print("  HF did not pack the row per sample: hf_sdpa_packed dropped", flush=True)
            modes = []
    for row_tokens, batch in batches.items():
        for method, packed in [*modes, ("hf_sdpa_rows", False)]:
            result = measure(hf_step(model, batch, packed=packed), device, args.warmup, args.reps)
            rows.append(_row(method, row_tokens, args.sample_tokens, result, params, shape))
            print(f"  {method} T={row_tokens}: {rows[-1]['step_ms']:.1f} ms", flush=True)
    _release(model)
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict]) -> None:
    """Each row's tokens/s and peak memory as a multiple of the best HF row at the same row length."""
    for row in rows:
        hf = [r for r in rows if r["method"].startswith("hf_") and r["row_tokens"] == row["row_tokens"]]
        best = max(hf, key=lambda r: r["tokens_per_s"])
        row["speed_vs_best_hf"] = row["tokens_per_s"] / best["tokens_per_s"]
        row["memory_vs_best_hf"] = row["peak_extra_gib"] / best["peak_extra_gib"] if best["peak_extra_gib"] else math.nan


def format_table(rows: list[dict]) -> str:
    lines = ["| method | tokens/row | step ms | tokens/s | MFU | peak extra GiB | speed vs best HF | memory vs best HF |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['row_tokens']} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mfu']:.3f} | {r['peak_extra_gib']:.2f} | {r['speed_vs_best_hf']:.2f}x | "
                     f"{r['memory_vs_best_hf']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--row-tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--sample-tokens", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (smoke test of the code path)")
    parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU (with --tiny; figures mean nothing)")
    parser.add_argument("--json", help="write the rows and the versions here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() and not args.allow_cpu:
        print("policy_step_gpu: needs CUDA (use --tiny --allow-cpu for a CPU smoke run)")
        return []
    rows = run(args)
    print(format_table(rows))
    if args.json:
        import megatron.core
        import transformers

        env = {"torch": torch.__version__, "transformers": transformers.__version__,
               "megatron_core": megatron.core.__version__,
               "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "hf_packed_rows": hf_packing_supported(), "ours_logits_dtype_by_fp32_output": args.logits_dtype}
        with open(args.json, "w") as handle:
            json.dump({"env": env, "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
