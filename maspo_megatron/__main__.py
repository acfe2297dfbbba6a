"""`python -m maspo_megatron {train,plan,convert} ...`: the one command line (`--help` lists every command).

    python -m maspo_megatron train --config FILE [dotted.key=value ...]    # = python -m maspo_megatron.train
    python -m maspo_megatron convert to-megatron --hf-dir HF --out-dir MEG --tp 2 --pp 2
    python -m maspo_megatron convert to-hf --megatron-dir MEG --out-dir HF2

`convert-to-megatron` and `convert-to-hf` remain as the older names of the two converters.

`plan`: estimated memory per GPU of a config on a cluster shape.

    python -m maspo_megatron plan --config examples/qwen2.5_7b.yaml --nodes 1 --gpus-per-node 8 [--gpu-mem-gib 80]
        [--rollout-nodes R] [--hf-config PATH] [dotted.key=value ...]

Prints weights, gradients, optimizer state, activations and KV cache per GPU (maspo_megatron/
launch/memory.py states the assumptions) and exits 0 when the plan fits, 1 when it does not (with
what to change), 2 on bad input. Model shapes come from the HF config: `--hf-config`, else
`model.hf_config` when that path exists, else the shape file shipped for it in examples/hf_configs/
(matched by the directory name, e.g. /models/Qwen2.5-7B-Instruct -> qwen2.5-7b-instruct.json).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from maspo_megatron.config import ConfigError, load_config

SHAPES_DIR = Path(__file__).resolve().parents[1] / "examples" / "hf_configs"


def resolve_hf_config(hf_config: str, override: Optional[str]) -> tuple[object, str]:
    """(HF config dict or path, where it came from) for the planner; ConfigError when none is found."""
    if override:
        if not Path(override).exists():
            raise ConfigError(f"--hf-config: {override} not found")
        return override, override
    if hf_config == "tiny":
        from maspo_megatron.data.tiny_tokenizer import tiny_vocab

        return "tiny", f"built-in tiny policy, vocab {len(tiny_vocab())}"
    path = Path(hf_config)
    if path.exists():
        return str(path), str(path)
    shipped = SHAPES_DIR / f"{path.name.lower().removesuffix('.json')}.json"
    if shipped.is_file():
        return str(shipped), f"shape file {shipped.relative_to(SHAPES_DIR.parents[1])}"
    raise ConfigError(f"model.hf_config: {hf_config} does not exist and there is no shape file {shipped.name} "
                      f"in {SHAPES_DIR}; pass --hf-config PATH/config.json")


def plan_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m maspo_megatron plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config YAML")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0)
    parser.add_argument("--rollout-nodes", type=int, default=0, help="disaggregated: nodes that only run SGLang")
    parser.add_argument("--reserve-gib", type=float, default=3.0, help="per GPU, for CUDA context / NCCL / fragmentation")
    parser.add_argument("--hf-config", help="HF config.json or model dir with the model's shape")
    parser.add_argument("overrides", nargs="*", help="training-config overrides, e.g. parallel.tp=4")
    args = parser.parse_args(argv)
    for name in ("nodes", "gpus_per_node"):
        if getattr(args, name) < 1:
            print(f"maspo plan: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.gpu_mem_gib <= args.reserve_gib or args.rollout_nodes < 0:
        print("maspo plan: --gpu-mem-gib must exceed --reserve-gib and --rollout-nodes must be >= 0", file=sys.stderr)
        return 2
    from maspo_megatron.launch.memory import ClusterShape, PlanError, format_plan, plan_memory, suggestion
    from maspo_megatron.rollout.registry import check_rollout_names

    try:
        cfg = load_config(args.config, args.overrides)
        check_rollout_names(cfg.rollout)  # the plan asks the engine's traits (rollout/registry.py)
        source, where = resolve_hf_config(cfg.model.hf_config, args.hf_config)
        from maspo_megatron.models.meta import model_meta

        if source == "tiny":
            from maspo_megatron.data.tiny_tokenizer import tiny_vocab
            from maspo_megatron.models.tiny import tiny_hf_config

            source = tiny_hf_config(cfg.model, len(tiny_vocab()))
        meta = model_meta(source, tp=cfg.parallel.tp, vocab_divisible_by=cfg.model.vocab_divisible_by)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"maspo plan: {exc}", file=sys.stderr)
        return 2
    shape = ClusterShape(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem_gib=args.gpu_mem_gib,
                         rollout_nodes=args.rollout_nodes, reserve_gib=args.reserve_gib)
    try:
        plan = plan_memory(meta, cfg, shape)
    except PlanError as exc:
        print(f"maspo plan: refused: {exc}", file=sys.stderr)
        return 1
    print(format_plan(plan, meta, cfg, shape, where))
    if not plan.fits:
        print(f"maspo plan: refused: {args.config} needs {plan.peak / 2**30:.1f} GiB per GPU but only "
              f"{plan.usable / 2**30:.1f} GiB are usable; try {suggestion(plan, cfg)}", file=sys.stderr)
        return 1
    return 0


def _train(argv) -> int:
    from maspo_megatron.train import main as train_main

    return train_main(argv, prog="python -m maspo_megatron train")


def _convert_to_megatron(argv, prog: str = "python -m maspo_megatron convert to-megatron") -> int:
    from maspo_megatron.checkpoint.convert_cli import to_megatron_main

    return to_megatron_main(argv, prog=prog)


def _convert_to_hf(argv, prog: str = "python -m maspo_megatron convert to-hf") -> int:
    from maspo_megatron.checkpoint.convert_cli import to_hf_main

    return to_hf_main(argv, prog=prog)


def _kept_name(run, prog: str):
    """An older command name that still works: the same command under its own usage line."""
    return lambda argv: run(argv, prog=prog)


# name -> (run(argv) -> exit code, one line of help); the converters' help lines without importing them
CONVERT_COMMANDS = {
    "to-megatron": (_convert_to_megatron, "Hugging Face checkpoint -> Megatron dist checkpoint (torch_dist)"),
    "to-hf": (_convert_to_hf, "Megatron dist checkpoint (any TP/PP) -> Hugging Face safetensors"),
}


def _convert(argv) -> int:
    return dispatch(CONVERT_COMMANDS, argv, "python -m maspo_megatron convert")


COMMANDS = {
    "train": (_train, "RL training (MASPO) on Megatron-Core; also `python -m maspo_megatron.train`, `maspo-train`"),
    "plan": (plan_main, "estimated memory per GPU of a config on a cluster shape (exit 1 when it does not fit)"),
    "convert": (_convert, "checkpoint conversion: `convert to-megatron` (HF -> Megatron) | `convert to-hf` (Megatron -> HF)"),
    "convert-to-megatron": (_kept_name(_convert_to_megatron, "python -m maspo_megatron convert-to-megatron"),
                            "the same as `convert to-megatron` (the older name)"),
    "convert-to-hf": (_kept_name(_convert_to_hf, "python -m maspo_megatron convert-to-hf"),
                      "the same as `convert to-hf` (the older name)"),
}


def usage(commands: dict, prog: str) -> str:
    width = max(len(name) for name in commands)
    lines = [f"usage: {prog} {{{','.join(commands)}}} [args ...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in commands.items()]
    lines += ["", f"`{prog} COMMAND --help` for a command's options."]
    return "\n".join(lines)


def dispatch(commands: dict, argv, prog: str) -> int:
    """Runs the command argv[0] names with the rest; --help lists the commands (exit 0), none or an
    unknown one is the list on stderr or one line naming the choices (exit 2)."""
    argv = list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(usage(commands, prog))
        return 0
    if not argv:
        print(usage(commands, prog), file=sys.stderr)
        return 2
    if argv[0] not in commands:
        print(f"{prog}: unknown command {argv[0]!r} (choose from {', '.join(commands)}; --help)", file=sys.stderr)
        return 2
    return commands[argv[0]][0](argv[1:])


def main(argv=None) -> int:
    return dispatch(COMMANDS, sys.argv[1:] if argv is None else argv, "python -m maspo_megatron")


if __name__ == "__main__":
    sys.exit(main())
