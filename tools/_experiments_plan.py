"""The sweep as data: which runs exist, their command lines, where they write, whether they finished.

A sweep file (examples/experiments/sweep.yaml) names a base config, seeds, per-seed overrides,
the warm-up overrides, the held-out set and the methods (each a list of dotted overrides). This
module turns it into `Job`s (one warm-up per seed, one RL run per method x seed) without running
anything; tools/run_experiments.py executes them and tools/_experiments_report.py reads them.

Layout under the output root:
    warmup/seed<s>/hf/, warmup/seed<s>/warmup_eval.json     (the shared starting point)
    runs/<method>/seed<s>/metrics.jsonl, final_eval.json     (final_eval.json marks a finished run)
    train.jsonl, heldout.jsonl                              (the task split in two, `plain` layout)
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
WARMUP_SCRIPT = REPO / "tools" / "_experiments_warmup.py"
HELDOUT_NAME = "heldout"
_TASK_DRAWS = 50_000  # random draws from which the distinct problems of the task are collected


class SweepError(ValueError):
    """A bad sweep file; the one-line message names the file and key."""


@dataclasses.dataclass
class Method:
    name: str
    label: str
    overrides: List[str]
    ablation: bool = False
    base: Optional[str] = None   # with a learning-rate grid: the method this one is a copy of
    lr: Optional[float] = None   # ... and its trainer.lr


@dataclasses.dataclass
class Sweep:
    path: Path
    base: Path
    seeds: List[int]
    seed_overrides: List[str]
    warmup_overrides: List[str]
    heldout_prompts: int
    heldout_seed: int
    threshold_reward: float
    threshold_window: int
    methods: Dict[str, Method]
    learning_rates: List[float] = dataclasses.field(default_factory=list)

    def method_names(self) -> List[str]:
        return list(self.methods)


@dataclasses.dataclass
class Job:
    """One process to run: a warm-up (method None) or an RL run."""

    kind: str  # "warmup" | "rl"
    seed: int
    method: Optional[str]
    out_dir: Path
    argv: List[str]

    @property
    def name(self) -> str:
        return f"warmup/seed{self.seed}" if self.kind == "warmup" else f"{self.method}/seed{self.seed}"

    @property
    def done_marker(self) -> Path:
        return self.out_dir / ("warmup_eval.json" if self.kind == "warmup" else "final_eval.json")

    @property
    def spec_file(self) -> Path:
        return self.out_dir / "job.json"

    def spec(self) -> dict:
        """What makes a finished run reusable: its arguments (not the interpreter's path)."""
        return {"kind": self.kind, "seed": self.seed, "method": self.method, "args": self.argv[1:]}

    def is_done(self) -> bool:
        """Finished, and with the same arguments as now (a changed sweep or --set reruns the job)."""
        if not self.done_marker.is_file() or not self.spec_file.is_file():
            return False
        try:
            return json.loads(self.spec_file.read_text()) == self.spec()
        except json.JSONDecodeError:
            return False


def _require(data: dict, key: str, kind: type, path: Path):
    if key not in data:
        raise SweepError(f"{path}: {key}: missing")
    value = data[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise SweepError(f"{path}: {key}: expected {kind.__name__}, got {value!r}")
    return value


def _str_list(value, key: str, path: Path) -> List[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise SweepError(f"{path}: {key}: expected a list of 'dotted.key=value' strings, got {value!r}")
    return list(value)


def load_sweep(path: str | Path) -> Sweep:
    """Reads and checks a sweep file (errors name the file and the key)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping at the top level")
    base = path.parent / _require(data, "base", str, path)
    if not base.is_file():
        raise SweepError(f"{path}: base: {base} not found")
    seeds = _require(data, "seeds", list, path)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds):
        raise SweepError(f"{path}: seeds: expected a non-empty list of non-negative integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{path}: seeds: duplicates in {seeds!r}")
    heldout = _require(data, "heldout", dict, path)
    threshold = _require(data, "threshold", dict, path)
    methods_raw = _require(data, "methods", dict, path)
    if not methods_raw:
        raise SweepError(f"{path}: methods: empty")
    methods = {}
    for name, spec in methods_raw.items():
        if not isinstance(spec, dict) or not str(name).replace("_", "").isalnum():
            raise SweepError(f"{path}: methods.{name}: expected a mapping under an identifier-like name")
        unknown = set(spec) - {"label", "overrides", "ablation"}
        if unknown:
            raise SweepError(f"{path}: methods.{name}.{sorted(unknown)[0]}: unknown key (label, overrides, ablation)")
        methods[name] = Method(name=name, label=str(spec.get("label", name)),
                               overrides=_str_list(spec.get("overrides", []), f"methods.{name}.overrides", path),
                               ablation=bool(spec.get("ablation", False)))
    rates = data.get("learning_rates", [])
    if not isinstance(rates, list) or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0
                                              for r in rates) or len(set(rates)) != len(rates):
        raise SweepError(f"{path}: learning_rates: expected a list of distinct positive numbers, got {rates!r}")
    if rates:
        methods = expand_learning_rates(methods, [float(r) for r in rates])
    sweep = Sweep(
        path=path, base=base, seeds=seeds,
        seed_overrides=_str_list(data.get("seed_overrides", []), "seed_overrides", path),
        warmup_overrides=_str_list(data.get("warmup_overrides", []), "warmup_overrides", path),
        heldout_prompts=int(_require(heldout, "num_prompts", int, path)),
        heldout_seed=int(_require(heldout, "seed", int, path)),
        threshold_reward=float(_require(threshold, "reward", (int, float), path)),
        threshold_window=int(_require(threshold, "window", int, path)),
        methods=methods,
        learning_rates=[float(r) for r in rates],
    )
    if sweep.heldout_prompts < 1 or sweep.threshold_window < 1:
        raise SweepError(f"{path}: heldout.num_prompts and threshold.window must be >= 1")
    return sweep


def expand_learning_rates(methods: Dict[str, Method], rates: List[float]) -> Dict[str, Method]:
    """Each method once per learning rate: `<name>_lr<i>` with `trainer.lr=<rate>` after its own overrides."""
    out = {}
    for method in methods.values():
        for i, rate in enumerate(rates):
            name = f"{method.name}_lr{i}"
            out[name] = Method(name=name, label=f"{method.label}, lr {rate:g}",
                               overrides=method.overrides + [f"trainer.lr={rate!r}"], ablation=method.ablation,
                               base=method.name, lr=rate)
    return out


def seed_overrides(sweep: Sweep, seed: int) -> List[str]:
    return [o.replace("{seed}", str(seed)) for o in sweep.seed_overrides]


def check_overrides(sweep: Sweep, extra: List[str]) -> None:
    """Loads every run's config once, so that a typo fails before the first process starts."""
    from maspo_megatron.config import ConfigError, load_config

    for seed in sweep.seeds:
        for method in sweep.methods.values():
            overrides = seed_overrides(sweep, seed) + method.overrides + extra
            try:
                load_config(sweep.base, overrides)
            except ConfigError as exc:
                raise SweepError(f"{sweep.path}: methods.{method.name} (seed {seed}): {exc}") from None
        try:
            load_config(sweep.base, seed_overrides(sweep, seed) + sweep.warmup_overrides + extra)
        except ConfigError as exc:
            raise SweepError(f"{sweep.path}: warmup_overrides (seed {seed}): {exc}") from None


def write_task_files(sweep: Sweep, root: Path, extra: List[str], draws: int = _TASK_DRAWS) -> tuple:
    """(`root/train.jsonl`, `root/heldout.jsonl`): the base config's synthetic task split in two, disjoint.

    The distinct problems of the task (`data.synthetic.*`) are drawn in a random order fixed by
    `heldout.seed`; the first `heldout.num_prompts` are held out, the rest is the training set of
    every seed (rows carry the `reference` answer the supervised warm-up needs). So no held-out
    problem is ever trained on or rewarded, and all seeds see the same split (seeds change the
    order, the init and the sampling). Raises if the task is too small for the split.
    """
    from maspo_megatron.config import load_config
    from maspo_megatron.data.synthetic import ArithmeticTask, format_answer, noisy_answer

    cfg = load_config(sweep.base, seed_overrides(sweep, sweep.seeds[0]) + extra)
    task = cfg.data.synthetic
    distinct, seen = [], set()
    for raw in ArithmeticTask(task, seed=sweep.heldout_seed).generate(draws, "pool"):
        if raw.prompt not in seen:
            seen.add(raw.prompt)
            distinct.append(raw)
    if len(distinct) < 2 * sweep.heldout_prompts:
        raise SweepError(f"{sweep.path}: heldout.num_prompts: the task has only {len(distinct)} distinct problems; "
                         f"hold out at most half ({len(distinct) // 2}) or make it larger (data.synthetic.*)")
    noise_rng = random.Random(f"reference-noise:{sweep.heldout_seed}")

    def row(raw, noise: float) -> dict:
        shown = noisy_answer(int(raw.ground_truth), noise, noise_rng)  # data.synthetic.reference_noise
        return {"question": raw.prompt, "answer": raw.ground_truth, "reference": format_answer(shown, task.answer_format)}

    held_out = [row(raw, 0.0) for raw in distinct[: sweep.heldout_prompts]]
    train = [row(raw, task.reference_noise) for raw in distinct[sweep.heldout_prompts:]]
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, part in (("train", train), (HELDOUT_NAME, held_out)):
        path = root / f"{name}.jsonl"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in part))
        tmp.replace(path)
        paths.append(path)
    return tuple(paths)


def plan_jobs(sweep: Sweep, root: Path, task_files: tuple, extra: List[str],
              methods: Optional[List[str]] = None, seeds: Optional[List[int]] = None) -> List[Job]:
    """Warm-ups first, then RL runs seed-major (all methods of seed 1, then seed 2, ...), so that a
    sweep cut short still holds complete seeds. `extra` overrides apply to every job after the
    sweep's own (so `trainer.sft_warmup_steps` in `extra` changes only the warm-ups: RL jobs always
    start from their seed's warm-up with no warm-up of their own)."""
    methods = methods or sweep.method_names()
    seeds = seeds or sweep.seeds
    train_file, heldout_file = task_files
    data_overrides = [f"data.train_files=[{train_file}]", f"data.val_files={{{HELDOUT_NAME}: {heldout_file}}}",
                      "data.format=plain"]
    jobs = []
    for seed in seeds:
        out = root / "warmup" / f"seed{seed}"
        overrides = seed_overrides(sweep, seed) + data_overrides + sweep.warmup_overrides + extra
        jobs.append(Job("warmup", seed, None, out,
                        [sys.executable, str(WARMUP_SCRIPT), "--config", str(sweep.base), "--out", str(out)] + overrides))
    for seed in seeds:
        warm_hf = root / "warmup" / f"seed{seed}" / "hf"
        for name in methods:
            out = root / "runs" / name / f"seed{seed}"
            # The start point and output directory come last: no method or --set override may change them.
            overrides = (seed_overrides(sweep, seed) + data_overrides + sweep.methods[name].overrides + extra
                         + [f"model.init_from_hf={warm_hf}", "trainer.sft_warmup_steps=0", f"trainer.output_dir={out}"])
            jobs.append(Job("rl", seed, name, out,
                            [sys.executable, "-m", "maspo_megatron.train", "--config", str(sweep.base)] + overrides))
    return jobs
