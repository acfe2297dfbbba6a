"""One RL training step of a Qwen2.5-1.5B-shaped random policy on one GPU, with packed rows.

    python tools/gpu_rl_step.py [--row-tokens 4096] [--json PATH]

It drives the trainer's own pieces on the rank's device: `build_policy` (bf16, TP1), the
optimizer and schedule, `pack_mini_batches` (THD rows of `--row-tokens`, several samples each),
`compute_old_log_probs` and `ppo_update` (two mini-batches: the second is off-policy, so MASPO's
gate acts). Samples are random token ids (the weights are random too): this checks that the GPU
path runs and what it costs, not what it learns. Step 1 warms up; step 2 is timed. Prints one
JSON object (and writes it with --json): attention backend, row shape, seconds, tokens/s, peak
GPU memory, loss and grad norm.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _samples(count: int, prompt_tokens: int, response_tokens: int, vocab_size: int, seed: int):
    from maspo_megatron.trainer.batch import TrainSample

    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        ids = torch.randint(0, vocab_size, (prompt_tokens + response_tokens,), generator=gen).tolist()
        old = (torch.randn(response_tokens, generator=gen) * 0.5 - 12.0).tolist()
        out.append(TrainSample(ids[:prompt_tokens], ids[prompt_tokens:], 1.0 if index % 2 else -1.0, old))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-config", default=str(REPO / "examples/hf_configs/qwen2.5-1.5b-instruct.json"))
    parser.add_argument("--row-tokens", type=int, default=4096)
    parser.add_argument("--sample-tokens", type=int, default=512, help="prompt + response tokens per sample")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_rl_step: needs a CUDA GPU", file=sys.stderr)
        return 2
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    from maspo_megatron.config import load_config
    from maspo_megatron.parallel import destroy_distributed, init_distributed
    from maspo_megatron.trainer.optim import build_optimizer, build_scheduler
    from maspo_megatron.trainer.setup import build_policy
    from maspo_megatron.trainer.train_step import compute_old_log_probs, pack_mini_batches, ppo_update

    cfg = load_config(None, [f"model.hf_config={args.hf_config}", "model.dtype=bf16", "model.seed=1",
                             f"trainer.micro_batch_tokens={args.row_tokens}", "algorithm.mini_batches=2",
                             "trainer.lr=1e-6", "trainer.total_steps=10", "rollout.temperature=1.0"])
    dims = init_distributed(cfg.parallel, seed=1)
    policy = build_policy(cfg, dims, tokenizer=None)
    optimizer = build_optimizer(cfg, policy.chunks)
    scheduler = build_scheduler(cfg, optimizer)
    prompt = args.sample_tokens // 8
    samples = _samples(args.samples, prompt, args.sample_tokens - prompt, policy.meta.vocab_size, seed=5)
    result = {"attention_backend": policy.attention_backend, "device": str(dims.device),
              "params_b": sum(p.numel() for c in policy.chunks for p in c.parameters()) / 1e9}
    for step in (1, 2):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        mini = pack_mini_batches(samples, cfg, dims, policy.attention_backend)
        drift = compute_old_log_probs(policy, mini, cfg, dims)
        train = ppo_update(policy, optimizer, scheduler, mini, cfg, dims)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - started
        rows = [tuple(mb.tokens.shape) for batches in mini for mb in batches]
        tokens = sum(r[0] * r[1] for r in rows)
        result.update({f"step{step}_s": round(seconds, 3), "rows": rows,
                       "samples_per_row": args.row_tokens // args.sample_tokens,
                       "tokens_per_s_step": round(tokens / seconds),  # old log-probs + 2 updates per token
                       "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                       "loss": train.get("train/loss"), "grad_norm": train.get("train/grad_norm"),
                       "drift_abs_mean": drift.get("rollout/logprob_diff_abs_mean"),
                       "skipped_steps": train.get("train/skipped_steps")})
    destroy_distributed()
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    ok = result["attention_backend"] != "dense" and result["skipped_steps"] == 0 and result["loss"] == result["loss"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
