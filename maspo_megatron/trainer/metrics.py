"""Per-step metrics: console (progress bar + one-line summary), metrics.jsonl, TensorBoard, W&B.

Only the driver (global rank 0) writes; every other rank gets a `MetricsLogger` whose methods do
nothing, so callers never branch on the rank.

The console shows every `console_every`-th step (trainer.log_every), the last one, and any step
with a skipped optimizer step; `<output_dir>/metrics.jsonl` holds one JSON object per step, with at least `step` and
`rollout/reward_mean`; a NaN or infinite metric is written as `null`. On resume from step k the file is cut back to the lines with step <= k, so
that a run killed after logging but before checkpointing does not log those steps twice.
"""
from __future__ import annotations

import json
import math
import secrets
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, TextIO

from maspo_megatron.utils.files import write_text_atomically

# The summary line shows these keys (when present) in this order, with short labels.
SUMMARY_KEYS = (
    ("rollout/reward_mean", "reward"),
    ("rollout/accuracy", "acc"),
    ("rollout/response_length_mean", "len"),
    ("train/loss", "loss"),
    ("train/grad_norm", "gnorm"),
    ("train/lr", "lr"),
    ("maspo/gated_pos_frac", "gated+"),
    ("maspo/gated_neg_frac", "gated-"),
    ("train/entropy", "ent"),
    ("rollout/dropped_groups", "dropped"),
    ("time/step_s", "s"),
)


def _scalar(value: Any) -> Any:
    """0-dim tensors / numpy scalars -> Python numbers; anything else unchanged."""
    return value.item() if hasattr(value, "item") and callable(value.item) else value


def jsonable(value: Any) -> Any:
    """floats stay floats, tensors -> float; NaN/inf -> None, written as JSON null (every line stays strict
    JSON, and a numeric reader meets no string: it reads null as a missing value)."""
    value = _scalar(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomically(path: Path, record: dict) -> None:
    """`record` as one strict-JSON file (values through `jsonable`), written atomically
    (utils/files.py), so a reader never sees half a file (the sweep runner takes final_eval.json as "run done")."""
    write_text_atomically(path, json.dumps({k: jsonable(v) for k, v in record.items()}, indent=1, sort_keys=True))


def format_summary(step: int, total_steps: int, metrics: Dict[str, Any]) -> str:
    """`step 3/50 [###.......] reward 0.412 acc 0.375 ...` (one line)."""
    width = 20
    filled = int(round(width * step / max(total_steps, 1)))
    parts = [f"step {step}/{total_steps} [{'#' * filled}{'.' * (width - filled)}]"]
    for key, label in SUMMARY_KEYS:
        if key in metrics:
            value = metrics[key]
            if isinstance(value, float):
                text = f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"
            else:
                text = str(value)
            parts.append(f"{label} {text}")
    if metrics.get("train/skipped_steps"):
        parts.append(f"SKIPPED {metrics['train/skipped_steps']} optimizer step(s): non-finite grad norm")
    return " ".join(parts)


WANDB_RUN_ID_FILE = "wandb_run_id"


class MetricsLogger:
    """Writes one record per step to every enabled sink. `enabled=False` (non-driver ranks): no-op."""

    def __init__(
        self,
        output_dir: str | Path,
        total_steps: int,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        wandb_project: Optional[str] = None,
        run_config: Optional[dict] = None,
        resume_step: int = 0,
        console_every: int = 1,
        stream: TextIO = sys.stdout,
    ) -> None:
        self.enabled = enabled
        self.console_every = console_every
        self.total_steps = total_steps
        self.stream = stream
        self._tb = None
        self._wandb = None
        self._phase_started = time.monotonic()
        if not enabled:
            return
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.output_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._jsonl = self.jsonl_path.open("a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.output_dir / "tensorboard"), purge_step=resume_step + 1)
        if wandb_project:
            try:
                import wandb
            except ImportError:
                raise RuntimeError(
                    "trainer.wandb_project: W&B logging needs the wandb package (pip install 'maspo_megatron[wandb]')"
                ) from None
            self._wandb = wandb.init(project=wandb_project, config=run_config or {}, dir=str(self.output_dir),
                                     id=self._wandb_run_id(resume_step), resume="allow")

    def _wandb_run_id(self, resume_step: int) -> str:
        """The W&B run a resumed run continues (its id kept in <output_dir>/wandb_run_id); a new one on a fresh start."""
        path = self.output_dir / WANDB_RUN_ID_FILE
        run_id = path.read_text().strip() if resume_step > 0 and path.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)  # W&B run ids: lower-case letters and digits
            path.write_text(run_id + "\n")
        return run_id

    def _truncate_after(self, step: int) -> None:
        if not self.jsonl_path.exists():
            return
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if record.get("step", 0) <= step:
                kept.append(line)
        self.jsonl_path.write_text("".join(k + "\n" for k in kept))

    def phase(self, step: int, name: str) -> None:
        """Console progress inside a step (`step 3/50 | rollout ...`), overwritten in place on a TTY."""
        if not self.enabled:
            return
        if self.stream.isatty():
            self.stream.write(f"\rstep {step}/{self.total_steps} | {name} ...\033[K")
            self.stream.flush()

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: jsonable(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:  # numbers as numbers (NaN too; W&B plots it as a gap), the step as W&B's own
            self._wandb.log({k: _scalar(v) for k, v in metrics.items()}, step=step)
        if step % self.console_every == 0 or step == self.total_steps or metrics.get("train/skipped_steps"):
            prefix = "\r" if self.stream.isatty() else ""
            self.stream.write(prefix + format_summary(step, self.total_steps, metrics) + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
