"""A contextual bandit trained with the project's own policy losses: the simulation of the mechanism check.

The policy is a table of logits theta[S, K] (S states, K actions, softmax per state). Each state
has a few correct actions (reward 1, all others 0); one "mode" action per state gets an extra
logit (correct in one state of four). With the defaults, over seeds 1-30: start J 0.065, the
largest action probability 0.20 on average, entropy 4.06 nats, and 90 % of the correct actions
start rare (p < 0.01): the regime where a clip, a soft gate and a mass-adaptive width differ.
One RL step:

    states   P prompts drawn uniformly; G actions each from the old policy (inverse-CDF sampling)
    rewards  1 if the action is correct; advantages by maspo_megatron.algorithms.group_advantages
    updates  the P*G samples cut into `mini_batches`, visited for `epochs` (Adam, token-mean over
             the mini-batch): policy_loss(loss, log_prob[n, 1], old_log_prob[n, 1], adv[n, 1], mask)

Pairing: every random draw (init, correct sets, states, the uniforms behind each sampled action,
the mini-batch order) comes from generators seeded by (seed, step) only, never by the arm, so two
arms with the same policy draw the same batch, and arms that stay close draw close batches.

Measured exactly (no sampling noise): the expected reward J = mean_s sum_a pi(a|s) R(s, a) after
every RL step, the policy entropy, and the probability mass on the correct actions that started
rare (p < 0.01), which the mass-adaptive limiter is meant to help.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Mapping

import torch

from maspo_megatron.algorithms import aggregate_loss, group_advantages, maspo_statistics, policy_loss
from maspo_megatron.algorithms.registry import loss_hyperparameters


@dataclasses.dataclass(frozen=True)
class BanditConfig:
    states: int = 32
    actions: int = 256
    correct_per_state: int = 8
    mode_logit: float = 4.5        # the "mode" action's extra logit (about 0.2 of the mass at the start)
    logit_std: float = 1.5         # spread of the other logits (many rare actions)
    prompts_per_step: int = 16
    samples_per_prompt: int = 8
    mini_batches: int = 8
    epochs: int = 2
    steps: int = 30
    rare_p: float = 0.01           # "rare" correct action: initial probability below this


@dataclasses.dataclass(frozen=True)
class Arm:
    """A loss and its hyperparameters (keys of the registered loss; missing ones take defaults)."""

    name: str
    loss: str
    hyper: Mapping[str, object] = dataclasses.field(default_factory=dict)


def _generator(*keys: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(hash(tuple(keys)) % (2**62))
    return gen


def make_problem(cfg: BanditConfig, seed: int) -> tuple:
    """(theta0[S, K] float64 initial logits, correct[S, K] bool), fixed by the seed only."""
    gen = _generator(seed, -1)
    theta = torch.randn(cfg.states, cfg.actions, generator=gen, dtype=torch.float64, device="cpu") * cfg.logit_std
    mode = torch.randint(cfg.actions, (cfg.states,), generator=gen, device="cpu")
    theta[torch.arange(cfg.states), mode] += cfg.mode_logit
    correct = torch.zeros(cfg.states, cfg.actions, dtype=torch.bool, device="cpu")
    for s in range(cfg.states):
        order = torch.randperm(cfg.actions, generator=gen, device="cpu")
        # The mode is correct in one state out of four, so the start is neither solved nor hopeless.
        picks = order[: cfg.correct_per_state]
        if s % 4 == 0:
            picks = torch.cat([picks[:-1], mode[s: s + 1]])
        else:
            picks = picks[picks != mode[s]][: cfg.correct_per_state - 1]
        correct[s, picks] = True
    return theta, correct


def expected_reward(theta: torch.Tensor, correct: torch.Tensor) -> float:
    """J = mean over states of the probability of a correct action (theta[S, K], correct[S, K])."""
    probs = torch.softmax(theta, dim=-1)
    return float((probs * correct).sum(-1).mean())


def entropy(theta: torch.Tensor) -> float:
    logp = torch.log_softmax(theta, dim=-1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def sample_batch(theta: torch.Tensor, cfg: BanditConfig, seed: int, step: int) -> tuple:
    """(state[N] long, action[N] long) for N = prompts x samples, groups contiguous; draws depend on (seed, step)."""
    gen = _generator(seed, step, 0)
    states = torch.randint(cfg.states, (cfg.prompts_per_step,), generator=gen, device="cpu")
    states = states.repeat_interleave(cfg.samples_per_prompt)
    uniforms = torch.rand(states.numel(), generator=gen, dtype=torch.float64, device="cpu")
    cdf = torch.softmax(theta[states].detach(), dim=-1).cumsum(-1)
    actions = torch.searchsorted(cdf, uniforms.unsqueeze(-1)).squeeze(-1).clamp(max=cfg.actions - 1)
    return states, actions


def _maspo_hyper(arm: Arm) -> dict:
    """The MASPO hyperparameters the gate statistics are computed with: the arm's own for a maspo arm, defaults else."""
    return dict(arm.hyper) if arm.loss == "maspo" else {}


def run_arm(cfg: BanditConfig, arm: Arm, seed: int, lr: float) -> Dict[str, object]:
    """One training run. Returns curves (J, entropy, rare-correct mass per step, index 0 = start) and
    the run's MASPO statistic sums pooled over every optimizer step, plus the arm's own clip count."""
    theta0, correct = make_problem(cfg, seed)
    rare = correct & (torch.softmax(theta0, dim=-1) < cfg.rare_p)
    theta = theta0.clone().requires_grad_(True)
    optim = torch.optim.Adam([theta], lr=lr)
    curves = {"expected_reward": [expected_reward(theta0, correct)], "entropy": [entropy(theta0)],
              "rare_correct_mass": [float((torch.softmax(theta0, -1) * rare).sum(-1).mean())]}
    sums: Dict[str, torch.Tensor] = {}
    own_clipped = 0.0
    stat_hyper = _maspo_hyper(arm)
    n = cfg.prompts_per_step * cfg.samples_per_prompt
    if n % cfg.mini_batches:
        raise ValueError(f"mechanism_check: prompts_per_step x samples_per_prompt = {n} must divide into "
                         f"mini_batches = {cfg.mini_batches}")
    for step in range(1, cfg.steps + 1):
        states, actions = sample_batch(theta, cfg, seed, step)
        with torch.no_grad():
            old_lp = torch.log_softmax(theta[states], -1).gather(-1, actions[:, None])  # [N, 1]
        rewards = correct[states, actions].to(torch.float32)
        adv = group_advantages(rewards, cfg.samples_per_prompt, "grpo").to(torch.float64)[:, None]  # [N, 1]
        order_gen = _generator(seed, step, 1)
        for _epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=order_gen, device="cpu")
            for chunk in order.chunk(cfg.mini_batches):
                lp = torch.log_softmax(theta[states[chunk]], -1).gather(-1, actions[chunk, None])  # [n, 1]
                mask = torch.ones_like(lp, dtype=torch.bool)
                loss_tok, metrics = policy_loss(arm.loss, lp, old_lp[chunk], adv[chunk], mask, **arm.hyper)
                loss = aggregate_loss(loss_tok, mask, "token-mean", global_token_count=mask.numel())
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                own_clipped += float(metrics["clipped"].sum()) if "clipped" in metrics else 0.0
                batch = maspo_statistics(lp.detach(), old_lp[chunk], adv[chunk], mask, **stat_hyper)
                for key, value in batch.items():
                    sums[key] = sums.get(key, 0.0) + value
        with torch.no_grad():
            curves["expected_reward"].append(expected_reward(theta, correct))
            curves["entropy"].append(entropy(theta))
            curves["rare_correct_mass"].append(float((torch.softmax(theta, -1) * rare).sum(-1).mean()))
    return {"curves": curves, "sums": {k: float(v) for k, v in sums.items()}, "own_clipped_count": own_clipped}


def default_arms() -> List[Arm]:
    """GRPO, MASPO (defaults), unclipped PG (MASPO with a gate too wide to act), MASPO alpha = 0."""
    huge = 1e6
    return [
        Arm("grpo", "grpo"),
        Arm("maspo", "maspo"),
        Arm("pg_unclipped", "maspo", {"sigma_base": huge, "sigma_high": huge}),
        Arm("maspo_alpha0", "maspo", {"alpha": 0.0}),
    ]


def check_arm(arm: Arm) -> None:
    """A one-line error for an unknown loss or hyperparameter, before any run starts."""
    accepted = loss_hyperparameters(arm.loss)
    for key in arm.hyper:
        if key not in accepted:
            raise ValueError(f"mechanism_check: arm {arm.name!r}: {arm.loss!r} has no hyperparameter {key!r}")
