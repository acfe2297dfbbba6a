"""Entry point: `python -m maspo_megatron.train --config FILE [dotted.key=value ...]`.

PLACEHOLDER written by the lead until the RL loop (issue 8) lands: it loads and validates the
config, then runs the MASPO loss on a synthetic batch and prints its mass-adaptive statistics.
Contract kept by the real entry point (tests/config/test_config.py checks it): a ConfigError is
printed as ONE line on stderr and the process exits with code 2.
"""
from __future__ import annotations

import argparse
import sys

from maspo_megatron.config import ConfigError, load_config


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="maspo-train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=False, help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.maspo.alpha=0.5")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"maspo-train: config error: {exc}", file=sys.stderr)
        return 2
    import torch

    from maspo_megatron.algorithms import finalize_statistics, maspo_statistics, policy_loss

    generator = torch.Generator().manual_seed(cfg.trainer.seed)
    shape = (8, 32)
    old_log_prob = -torch.rand(shape, generator=generator) * 4
    log_prob = (old_log_prob + 0.3 * torch.randn(shape, generator=generator)).clamp(max=0).requires_grad_()
    advantages = torch.randn(shape[0], 1, generator=generator).expand(shape)
    mask = torch.ones(shape, dtype=torch.bool)
    hyper = cfg.algorithm.loss_hyper()
    loss_tok, _ = policy_loss(cfg.algorithm.loss, log_prob, old_log_prob, advantages, mask, **hyper)
    loss = loss_tok.sum() / mask.sum()
    loss.backward()
    print(f"{cfg.algorithm.loss} loss on a synthetic batch {tuple(shape)}: {loss.item():.6f}")
    if cfg.algorithm.loss == "maspo":
        stats = finalize_statistics(maspo_statistics(log_prob.detach(), old_log_prob, advantages, mask, **hyper))
        for key, value in sorted(stats.items()):
            print(f"  {key}: {value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
