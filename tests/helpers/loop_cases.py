"""Real Trainer runs (Megatron on gloo, local engine, math-verify) shared by the loop, checkpoint, colocated
and entry-point tests: the example config with tiny overrides, and the multi-process cases."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = str(REPO / "examples" / "cpu_tiny.yaml")


def tiny_overrides(output_dir: str, *extra: str) -> list[str]:
    """The CPU default, shrunk to seconds: 4 prompts x 4 samples, short answers, no TensorBoard."""
    return [
        f"trainer.output_dir={output_dir}", "trainer.total_steps=2", "trainer.prompts_per_step=4",
        "rollout.n_samples_per_prompt=4", "rollout.max_new_tokens=8", "trainer.sft_warmup_steps=2",
        "trainer.sft_batch_size=8", "trainer.save_every=0", "trainer.tensorboard=false",
        "trainer.eval_max_prompts=4", "trainer.eval_n_samples=2", "reward.num_workers=0",
        "data.synthetic.num_train=64", "data.synthetic.num_val=8", *extra,
    ]


def read_metrics(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def train(output_dir: str, overrides: list[str]):
    """Runs the Trainer to the end; returns (exit code, metrics records) on every rank."""
    from maspo_megatron.config import load_config
    from maspo_megatron.trainer.loop import Trainer

    cfg = load_config(EXAMPLE, tiny_overrides(output_dir, *overrides))
    code = Trainer(cfg).run()
    return {"code": code, "metrics": read_metrics(output_dir) if int(os.environ.get("RANK", 0)) == 0 else None}


class FaultyEngine:
    """Wraps the local engine: in every group, sample 0 is aborted (a fragment) and sample 1 is empty."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompts, n, sampling):
        from maspo_megatron.rollout import Sample

        groups = self.engine.generate(prompts, n, sampling)
        for group in groups:
            first = group[0]
            group[0] = Sample(first.token_ids[:2], first.log_probs[:2], "abort", first.weight_version)
            group[1] = Sample([], [], "stop", group[1].weight_version)
        return groups


def train_with_faulty_engine(output_dir: str, overrides: list[str]):
    from maspo_megatron.config import load_config
    from maspo_megatron.trainer.loop import Trainer

    cfg = load_config(EXAMPLE, tiny_overrides(output_dir, *overrides))
    trainer = Trainer(cfg)
    if trainer.ctx is not None:
        trainer.ctx.engine = FaultyEngine(trainer.ctx.engine)
    # Step 1's gradients are poisoned with NaN: its optimizer steps must be skipped, not applied.
    param = next(p for chunk in trainer.policy.chunks for p in chunk.parameters())
    param.register_hook(lambda grad: grad * float("nan") if trainer.step == 1 else grad)
    before = [p.detach().clone() for chunk in trainer.policy.chunks for p in chunk.parameters()]
    original_rl_step = trainer.rl_step
    after_step1 = {}

    def rl_step():
        metrics = original_rl_step()
        if trainer.step == 1:
            now = [p.detach() for chunk in trainer.policy.chunks for p in chunk.parameters()]
            after_step1["unchanged"] = all(torch.equal(a, b) for a, b in zip(before, now, strict=True))
            after_step1["lr"] = trainer.scheduler.num_steps
        return metrics

    trainer.rl_step = rl_step
    code = trainer.run()
    return {"code": code, "metrics": read_metrics(output_dir) if trainer.is_driver else None, **after_step1}
