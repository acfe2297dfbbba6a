"""docs/experiments.md from the finished runs of a sweep: plots, tables, raw CSV/JSON, all as measured.

    build_report(sweep, root, report_path, figures_dir)

Every number comes from the run directories (metrics.jsonl, final_eval.json, warmup_eval.json,
status.json); every seed of every method that finished is included (nothing is picked).
"""
from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Dict, List

from _experiments_plan import HELDOUT_NAME, Sweep, seed_overrides
from _experiments_plots import plot_maspo_stats, plot_metric
from _experiments_stats import (
    ENTROPY_KEY,
    REWARD_KEY,
    RunData,
    across_seeds,
    describe_difference,
    eval_key,
    gated_gate_weight,
    load_run,
    mean_std,
    paired_differences,
    run_mean,
    steps_to_threshold,
    tail_mean,
)

SMOOTH_STEPS = 5
MASPO_KEYS = [
    ("maspo/gated_pos_frac", "gated fraction, A>0 & r>1"),
    ("maspo/gated_neg_frac", "gated fraction, A<0 & r<1"),
    ("maspo/gate_weight_mean", "mean gate weight, all response tokens"),
    ("maspo/sigma_mean", "mean sigma (mass x risk)"),
    ("maspo/abs_log_ratio_mean", "mean abs(log r)"),
    ("maspo/ppo_clip_frac", "PPO clip fraction at eps 0.2"),
]
BUCKETS = ["p_lt_0.01", "p_0.01_0.1", "p_0.1_0.5", "p_gt_0.5"]


def _fmt(mean: float, std: float, digits: int = 3) -> str:
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if math.isfinite(std) else f"{mean:.{digits}f}"


def _shown_path(path: Path) -> str:
    """The path relative to the repository when it lies inside it (reports do not name one machine's folders)."""
    try:
        return str(Path(path).resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        return str(path)


def _machine() -> str:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem_gib:.0f} GiB RAM, Python {platform.python_version()}"


def collect(sweep: Sweep, root: Path) -> Dict[str, List[RunData]]:
    """Finished runs (final_eval.json present) per method, in sweep order; unfinished ones are left out."""
    out = {}
    for name in sweep.methods:
        runs = [load_run(root / "runs" / name / f"seed{seed}", name, seed) for seed in sweep.seeds]
        out[name] = [run for run in runs if run.final_eval is not None]
    return out


def _count_lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip()) if path.is_file() else 0


def _setting_rows(sweep: Sweep, root: Path, extra: List[str]) -> List[tuple]:
    from maspo_megatron.config import load_config
    from maspo_megatron.data.synthetic import format_answer

    cfg = load_config(sweep.base, seed_overrides(sweep, sweep.seeds[0]) + extra)
    warm = load_config(sweep.base, seed_overrides(sweep, sweep.seeds[0]) + sweep.warmup_overrides + extra)
    m, t, a, r, s = cfg.model, cfg.trainer, cfg.algorithm, cfg.rollout, cfg.data.synthetic
    lr_text = " / ".join(f"{rate:g}" for rate in sweep.learning_rates) + " (each method at each)" \
        if sweep.learning_rates else f"{t.lr:g}"
    return [
        ("policy", f"tiny Qwen2-shaped: {m.tiny_layers} layers, hidden {m.tiny_hidden}, {m.tiny_heads} heads "
                   f"({m.tiny_kv_heads} KV), FFN {m.tiny_ffn}, character tokenizer, fp32, TP1/PP1, 1 process"),
        ("task", f"synthetic arithmetic: {s.num_operands} operands in [{s.min_operand}, {s.max_operand}], ops "
                 f"{' '.join(s.operations)}, answers `{format_answer('n', s.answer_format)}` ({s.answer_format}); its distinct problems split "
                 f"once into {_count_lines(root / 'train.jsonl')} training and {_count_lines(root / 'heldout.jsonl')} "
                 "held-out (disjoint)"),
        ("reward", "math-verify: 1 correct, 0 otherwise"
                   + (f", on the answer that `reward.answer_pattern` `{cfg.reward.answer_pattern}` extracts"
                      if cfg.reward.answer_pattern else "")),
        ("warm-up (once per seed)", f"{warm.trainer.sft_warmup_steps} supervised steps x {warm.trainer.sft_batch_size} "
                                    f"reference answers, lr {warm.trainer.sft_lr:g}"
                                    + (f", {s.reference_noise:.0%} of the training references with one digit wrong "
                                       "(`data.synthetic.reference_noise`)" if s.reference_noise else "")
                                    + "; every method starts RL from it"),
        ("RL", f"{t.total_steps} steps x {t.prompts_per_step} prompts x {r.n_samples_per_prompt} samples "
               f"(T={r.temperature:g}, <= {r.max_new_tokens} new tokens), Adam lr {lr_text} constant, grad clip {t.grad_clip:g}"),
        ("where the gate acts", f"{a.mini_batches} mini-batches x {a.ppo_epochs} PPO epochs = "
                                f"{a.mini_batches * a.ppo_epochs} optimizer steps per rollout batch; "
                                f"old log-probs from the trainer, so r == 1 only on the first"),
        ("loss aggregation", f"{a.aggregation} over the global batch; advantages {a.advantage}; no KL, no entropy bonus"),
        ("evaluation", f"held-out set of {sweep.heldout_prompts} problems no seed trains on; "
                       f"{t.eval_n_samples} samples each at T={r.temperature:g} after the last step"
                       + (f" and every {t.eval_every} steps" if t.eval_every else "") + f": Avg@{t.eval_n_samples} "
                       f"(mean correctness) and Pass@{t.eval_n_samples} (any of {t.eval_n_samples} correct)"),
        ("seeds", f"{sweep.seeds} (a seed sets the model init, the warm-up, the data order and the sampling; "
                  "methods of one seed share the warm-up, so differences are paired by seed)"),
    ]


def _write_csvs(figures: Path, runs_by_method: Dict[str, List[RunData]], warm: Dict[int, dict]) -> None:
    rows = []
    for name, runs in runs_by_method.items():
        for run in runs:
            _, avg = eval_key(run.final_eval, HELDOUT_NAME, "avg")
            _, pas = eval_key(run.final_eval, HELDOUT_NAME, "pass")
            rows.append({"method": name, "seed": run.seed, "steps": len(run.records), "heldout_avg": avg,
                         "heldout_pass": pas, "reward_last5": tail_mean(run, REWARD_KEY, 5),
                         "entropy_last5": tail_mean(run, ENTROPY_KEY, 5),
                         "warmup_heldout_avg": eval_key(warm.get(run.seed), HELDOUT_NAME, "avg")[1]})
    with open(figures / "runs.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["method"])
        writer.writeheader()
        writer.writerows(rows)
    with open(figures / "curves.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "key", "step", "mean", "std", "seeds"])
        keys = [REWARD_KEY, ENTROPY_KEY] + [k for k, _ in MASPO_KEYS]
        for name, runs in runs_by_method.items():
            for key in keys:
                for step, mean, std, count in zip(*across_seeds(runs, key), strict=True):
                    writer.writerow([name, key, step, f"{mean:.6g}", f"{std:.6g}", count])


def build_report(sweep: Sweep, root: Path, report_path: Path, figures: Path, extra: List[str] = ()) -> None:
    extra = list(extra)
    figures.mkdir(parents=True, exist_ok=True)
    runs_by_method = collect(sweep, root)
    labels = {name: method.label for name, method in sweep.methods.items()}
    warm = {}
    for seed in sweep.seeds:
        path = root / "warmup" / f"seed{seed}" / "warmup_eval.json"
        if path.is_file():
            warm[seed] = json.loads(path.read_text())
    status = json.loads((root / "status.json").read_text()) if (root / "status.json").is_file() else {}
    baselines = [n for n, m in sweep.methods.items() if not m.ablation]
    ablations = [n for n, m in sweep.methods.items() if m.ablation]
    maspos = [n for n, m in sweep.methods.items() if n == "maspo" or m.base == "maspo"]  # with a grid: maspo_lr0
    reference = maspos[0] if maspos else baselines[0]
    panels = [("MASPO vs baselines", baselines)]
    if ablations:
        panels.append(("MASPO vs its ablations", [reference] + ablations))
    rel = os.path.relpath(figures, report_path.parent)
    plot_metric(figures / "reward_vs_step.png", runs_by_method, labels, panels, REWARD_KEY,
                "training reward (mean over the step's samples)", SMOOTH_STEPS, "Training reward",
                hline=sweep.threshold_reward)
    plot_metric(figures / "entropy_vs_step.png", runs_by_method, labels, panels, ENTROPY_KEY,
                "policy entropy (nats/token, response tokens)", SMOOTH_STEPS, "Policy entropy")
    plot_maspo_stats(figures / "maspo_stats.png", runs_by_method, labels, [reference] + ablations, MASPO_KEYS,
                     SMOOTH_STEPS)
    _write_csvs(figures, runs_by_method, warm)

    k_key, _ = next((eval_key(r.final_eval, HELDOUT_NAME, "avg") for rs in runs_by_method.values() for r in rs),
                    ("avg@k", math.nan))
    k = k_key.rsplit("@", 1)[-1] if k_key else "k"
    window, threshold = sweep.threshold_window, sweep.threshold_reward
    per_method: Dict[str, dict] = {}
    for name, runs in runs_by_method.items():
        reached = [steps_to_threshold(*run.series(REWARD_KEY), threshold, window) for run in runs]
        per_method[name] = {
            "seeds": [run.seed for run in runs],
            "avg": {run.seed: eval_key(run.final_eval, HELDOUT_NAME, "avg")[1] for run in runs},
            "pass": {run.seed: eval_key(run.final_eval, HELDOUT_NAME, "pass")[1] for run in runs},
            "reward_last": {run.seed: tail_mean(run, REWARD_KEY, window) for run in runs},
            "entropy_last": {run.seed: tail_mean(run, ENTROPY_KEY, window) for run in runs},
            "entropy_all": {run.seed: run_mean(run, ENTROPY_KEY) for run in runs},
            "steps_to_threshold": {run.seed: s for run, s in zip(runs, reached, strict=True)},
            "wall_s": [status.get(f"{name}/seed{run.seed}", {}).get("wall_s") for run in runs],
            "maspo": {key: mean_std([run_mean(run, key) for run in runs]) for key, _ in MASPO_KEYS},
            "gated_weight": mean_std([gated_gate_weight(run) for run in runs]),
            "buckets": {f"{b}/{q}": mean_std([run_mean(run, f"maspo/{b}/{q}") for run in runs])
                        for b in BUCKETS for q in ("token_frac", "ratio_mean", "gated_frac", "gate_weight_mean")},
        }
    (figures / "summary.json").write_text(json.dumps({"threshold": threshold, "window": window, "methods": per_method,
                                                      "warmup": warm, "status": status}, indent=1, sort_keys=True,
                                                     default=str))
    lines = _markdown(sweep, root, extra, runs_by_method, per_method, labels, warm, status, rel, k, reference)
    if sweep.learning_rates:  # the evidence sweep: preconditions and paired CIs before the tables
        from _experiments_evidence import evidence_section

        evidence, numbers = evidence_section(sweep, runs_by_method, warm, figures, rel)
        at = lines.index("## Setting") if "## Setting" in lines else len(lines)
        lines[at:at] = evidence
        (figures / "evidence.json").write_text(json.dumps(numbers, indent=1, default=str))
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text("\n".join(lines) + "\n")


def _markdown(sweep, root, extra, runs_by_method, per_method, labels, warm, status, rel, k, reference) -> List[str]:
    window, threshold = sweep.threshold_window, sweep.threshold_reward
    expected = len(sweep.seeds) * len(sweep.methods)
    finished = sum(len(r) for r in runs_by_method.values())
    walls = [v["wall_s"] for v in status.values() if isinstance(v, dict) and v.get("wall_s")]
    starts = [v["started_unix"] for v in status.values() if isinstance(v, dict) and "started_unix" in v]
    ends = [v["finished_unix"] for v in status.values() if isinstance(v, dict) and "finished_unix" in v]
    span = (f" Elapsed from the first job's start to the last job's end: {(max(ends) - min(starts)) / 60:.1f} min"
            " (an interrupted and resumed sweep counts its pause too)." if starts and ends else "")
    out = [
        "# Experiments: a small-scale MASPO reproduction on the CPU synthetic task",
        "",
        f"Generated by `tools/run_experiments.py` from the sweep `{_shown_path(sweep.path)}`"
        + (f" with `--set {' '.join(extra)}`" if extra else "") + f" on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {_machine()}. Runs finished: {finished}/{expected}"
        + (f"; job wall time {sum(walls) / 60:.1f} min in total ({len(walls)} jobs)." if walls else ".")
        + span,
        "Everything below is as measured, every finished seed of every method; nothing was picked.",
        "",
        "This is NOT the paper's setting (1.5B-14B models, AIME/MATH, Avg@32). It is a tiny model on a",
        "synthetic task, small enough to rerun in about an hour on 2 CPU cores, meant to show whether the",
        "mechanisms behave as described, not to reproduce the paper's numbers.",
        "",
        f"Reproduce: `.venv/bin/python tools/run_experiments.py --sweep {_shown_path(sweep.path)}"
        + (f" --set {' '.join(extra)}" if extra else "") + "` (resumable; "
        "`--report-only` rebuilds this page).",
        "",
        "## Setting",
        "",
        "| | |",
        "|---|---|",
    ]
    out += [f"| {key} | {value} |" for key, value in _setting_rows(sweep, root, extra)]
    out += [] if sweep.learning_rates else [  # the evidence sweep's reasons are in docs/experiments.md
        "", "Why this setting (the CPU default, `examples/cpu_tiny.yaml`, takes 5-8 minutes per run and its",
        "single-digit task has only 100 problems, so nothing could be held out):",
        "",
        "- The supervised warm-up runs once per seed and every method starts RL from its HF export",
        "  (`model.init_from_hf`), so 24 RL runs pay for 3 warm-ups, and methods of a seed start identical.",
        "- The task is split into disjoint training and held-out problems (`train.jsonl`, `heldout.jsonl`,",
        "  loaded as `data.train_files` / `data.val_files`), so Avg@k / Pass@k measure problems never rewarded.",
        "- The gate acts only when the policy has moved since the rollout: mini-batches x epochs > 1 (see the",
        "  table). With one on-policy mini-batch r == 1 and every method here would be the same policy gradient.",
        "- The RL learning rate (2e-4) is lower than the CPU default's 1e-3. One-seed pilots of MASPO and GRPO",
        "  (40 steps, not part of these results): at lr 1e-3 with 4 updates per batch both fell from 0.57 to",
        "  0.1-0.2 training reward within two steps; GRPO recovered to ~0.5, MASPO stayed near 0.2 with its",
        "  entropy rising 4x. At lr 5e-4 with 8 updates: both fell to ~0.3, GRPO recovered to ~0.6, MASPO to",
        "  ~0.4-0.5. At 2e-4 with 4 updates both rose to ~0.7 but the gate barely acted (|log r| ~ 0.008,",
        "  gate weight 0.999); 2e-4 with 8 updates (used here) was stable with more off-policy movement.",
        f"  Per-step data of those pilots: `{rel}/pilots.csv` (committed by hand, not rebuilt by the script).",
    ]
    out += [
        "",
        "Methods (overrides on top of the base config):", "",
    ]
    for name, method in sweep.methods.items():
        out.append(f"- **{method.label}** (`{name}`): `{' '.join(method.overrides) or '(base)'}`")
    warm_avg = mean_std([eval_key(w, HELDOUT_NAME, "avg")[1] for w in warm.values()])
    warm_pass = mean_std([eval_key(w, HELDOUT_NAME, "pass")[1] for w in warm.values()])
    out += [
        "", "## Results", "",
        f"Held-out accuracy after the last RL step ({k} samples per problem, mean ± sample std over seeds),",
        f"steps until the training reward, averaged over {window} consecutive steps, first reaches {threshold:g}",
        "(mean over the seeds that reached it; `n/N` seeds reached it), and the training reward and entropy",
        f"averaged over the last {window} steps.",
        "",
        f"| method | seeds | Avg@{k} held-out | Pass@{k} held-out | steps to reward {threshold:g} | reached | "
        f"train reward (last {window}) | entropy (last {window}) | Avg@{k} per seed |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| warm-up start (step 0) | {len(warm)} | {_fmt(*warm_avg)} | {_fmt(*warm_pass)} | | | | | "
        + ", ".join(f"{eval_key(w, HELDOUT_NAME, 'avg')[1]:.3f}" for _, w in sorted(warm.items())) + " |",
    ]
    for name, info in per_method.items():
        if not info["seeds"]:
            out.append(f"| {labels[name]} | 0 | not run | | | | | | |")
            continue
        reached = [s for s in info["steps_to_threshold"].values() if s is not None]
        out.append(
            f"| {labels[name]} | {len(info['seeds'])} | {_fmt(*mean_std(info['avg'].values()))} | "
            f"{_fmt(*mean_std(info['pass'].values()))} | {_fmt(*mean_std(reached), digits=1) if reached else 'never'} | "
            f"{len(reached)}/{len(info['seeds'])} | {_fmt(*mean_std(info['reward_last'].values()))} | "
            f"{_fmt(*mean_std(info['entropy_last'].values()))} | "
            + ", ".join(f"{v:.3f}" for _, v in sorted(info["avg"].items())) + " |")
    ref_label = labels.get(reference, reference)  # MASPO (with a learning-rate grid: at the first lr)
    out += ["", f"### Paired differences against {ref_label} (same seed = same warm-up start and data order)", "",
            f"| method | Δ Avg@{k} ({ref_label} − method) | Δ train reward, last {window} | Δ entropy, whole run |",
            "|---|---|---|---|"]
    ref = per_method.get(reference)
    for name, info in per_method.items():
        if name == reference or ref is None:
            continue
        out.append(f"| {labels[name]} | {describe_difference(paired_differences(ref['avg'], info['avg']))} | "
                   f"{describe_difference(paired_differences(ref['reward_last'], info['reward_last']))} | "
                   f"{describe_difference(paired_differences(ref['entropy_all'], info['entropy_all']))} |")
    out += hard_clip_check(runs_by_method)
    out += [
        "", f"With {len(sweep.seeds)} seeds a difference whose sign is mixed across seeds, or small against the seed "
        "spread in the table above, is not evidence either way.",
        "", "### Training reward", "", f"![reward vs step]({rel}/reward_vs_step.png)", "",
        "### Entropy", "",
        "The paper reports that MASPO keeps the policy entropy higher than the clipped baselines.", "",
        f"![entropy vs step]({rel}/entropy_vs_step.png)", "",
        "### MASPO mass-adaptive statistics", "",
        "Mean over all steps of each run, then mean ± std over seeds. The `maspo/*` keys are computed for every",
        "loss with the MASPO hyperparameters of the run (defaults unless the method overrides them), so for the",
        "baselines they say what MASPO's gate *would* have done to the same updates; `ppo_clip_frac` is the",
        "fraction of tokens a PPO clip at 0.2 would clip.",
        "",
        "The mean gate weight on gated tokens alone is derived per step as 1 − (1 − mean weight) / (gated",
        "fraction) (the trainer pools every optimizer step of an RL step, so this equals its",
        "`maspo/gate_weight_mean_gated`), then averaged over the steps that gated anything.",
        "",
        "| method | " + " | ".join(title for _, title in MASPO_KEYS) + " | gate weight on gated tokens (derived) |",
        "|---|" + "---|" * (len(MASPO_KEYS) + 1),
    ]
    for name, info in per_method.items():
        out.append(f"| {labels[name]} | " + " | ".join(_fmt(*info["maspo"][key], digits=4) for key, _ in MASPO_KEYS)
                   + f" | {_fmt(*info['gated_weight'], digits=4)} |")
    out += ["", f"By old-policy probability of the token ({labels.get(reference, reference)} runs):", "",
            "| p_old bucket | token fraction | mean ratio r | gated fraction | mean gate weight |", "|---|---|---|---|---|"]
    if ref is not None:
        for bucket in BUCKETS:
            cells = [_fmt(*ref["buckets"][f"{bucket}/{q}"], digits=4)
                     for q in ("token_frac", "ratio_mean", "gated_frac", "gate_weight_mean")]
            out.append(f"| {bucket} | " + " | ".join(cells) + " |")
    # Ablations that keep the gate (with gate=false the weights are only what the gate would have been).
    others = [n for n, m in sweep.methods.items() if m.ablation and per_method.get(n, {}).get("seeds")
              and "algorithm.maspo.gate=false" not in m.overrides]
    if ref is not None and others:
        out += ["", "Mean gate weight by p_old bucket, MASPO against its ablations (the mass-adaptive limiter should",
                "leave low-probability tokens less damped than alpha = 0 does):", "",
                "| p_old bucket | " + " | ".join(labels[n] for n in [reference] + others) + " |",
                "|---|" + "---|" * (1 + len(others))]
        for bucket in BUCKETS:
            out.append(f"| {bucket} | " + " | ".join(_fmt(*per_method[n]["buckets"][f"{bucket}/gate_weight_mean"], digits=4)
                                                     for n in [reference] + others) + " |")
    out += ["", f"![MASPO statistics]({rel}/maspo_stats.png)", "",
            "## Raw data", "",
            f"- `{rel}/runs.csv`: one row per run (held-out Avg/Pass, last-steps reward and entropy, warm-up start).",
            f"- `{rel}/curves.csv`: per method and step, mean/std over seeds of reward, entropy and the MASPO statistics.",
            f"- `{rel}/summary.json`: everything in the tables above, per seed, plus job wall times.",
            "- Per-step logs of each run: `<--out>/runs/<method>/seed<s>/metrics.jsonl` (not committed)."]
    return out


def hard_clip_check(runs_by_method: Dict[str, List[RunData]]) -> List[str]:
    """With gate=false MASPO's loss IS the PPO clip at 0.2 (alpha and beta then act on nothing), so
    `maspo_hard_clip` must repeat `grpo` step for step on each seed: a check of run determinism."""
    hard = {run.seed: run for run in runs_by_method.get("maspo_hard_clip", [])}
    grpo = {run.seed: run for run in runs_by_method.get("grpo", [])}
    seeds = sorted(set(hard) & set(grpo))
    if not seeds:
        return []
    same = [seed for seed in seeds
            if hard[seed].series(REWARD_KEY) == grpo[seed].series(REWARD_KEY)
            and eval_key(hard[seed].final_eval, HELDOUT_NAME, "avg") == eval_key(grpo[seed].final_eval, HELDOUT_NAME, "avg")]
    return ["", f"Check: with `gate=false` MASPO's loss is the hard clip at 0.2, i.e. GRPO's, so that ablation must "
                f"repeat GRPO exactly on each seed. Identical reward curves and held-out Avg on {len(same)}/{len(seeds)} "
                "seeds" + ("." if len(same) == len(seeds) else " (runs are not bit-reproducible here; read small "
                                                                 "differences in that light).")]
