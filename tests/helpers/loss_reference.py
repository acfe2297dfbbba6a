"""An INDEPENDENT reference of every policy loss: element-wise, float64, plain Python `math`.

Written from the formulas in ../shared/MASPO.md and the papers, not from the package: it does not
import maspo_megatron. Each function returns, per token, the loss value and its derivative with
respect to that token's own log-prob (derived by hand, not by autograd).
"""
from __future__ import annotations

import math

LIMIT = 20.0


def _log_ratio(lp: float, olp: float) -> tuple[float, float]:
    """Clamped log-ratio and d(clamped)/d(lp): 1 inside the window, 0 where the clamp binds."""
    x = lp - olp
    if x > LIMIT:
        return LIMIT, 0.0
    if x < -LIMIT:
        return -LIMIT, 0.0
    return x, 1.0


def _ppo(r: float, a: float, lo: float, hi: float) -> tuple[float, float]:
    """-min(r A, clip(r) A) and its derivative with respect to log r."""
    if a > 0:
        return (-a * r, -a * r) if r < hi else (-a * hi, 0.0)
    if a < 0:
        return (-a * r, -a * r) if r > lo else (-a * lo, 0.0)
    return 0.0, 0.0


def maspo(lp, olp, a, *, sigma_base=1.0, alpha=0.3, sigma_high=10.0, adv_low=0.1, adv_high=10.0,
          beta_pos=0.03, beta_neg=0.03, gate_grad="detached", gate=True, clip_eps=0.2, dual_clip_c=None):
    x, window = _log_ratio(lp, olp)
    r = math.exp(x)
    if gate:
        p_old = math.exp(olp)
        mass = min(max(sigma_base / p_old**alpha, sigma_base), sigma_high)
        if a > 0 and r > 1:
            sigma = mass * min(max(1 + beta_pos * a, adv_low), adv_high)
        elif a < 0 and r < 1:
            sigma = mass * min(max(1 / (1 - beta_neg * a), adv_low), adv_high)
        else:
            sigma = None
        w = 1.0 if sigma is None else math.exp(-((r - 1) ** 2) / (2 * sigma**2))
        loss = -a * w * r
        grad = loss
        if gate_grad == "full" and sigma is not None:
            grad = loss * (1 - r * (r - 1) / sigma**2)
    else:
        loss, grad = _ppo(r, a, 1 - clip_eps, 1 + clip_eps)
    if dual_clip_c is not None and a < 0 and loss > -a * dual_clip_c:
        loss, grad = -a * dual_clip_c, 0.0
    return loss, grad * window


def _cap(loss, grad, a, c):
    """The dual-clip cap -A c for A < 0 (no gradient where it binds); c None: off."""
    if c is not None and a < 0 and loss > -a * c:
        return -a * c, 0.0
    return loss, grad


def grpo(lp, olp, a, *, eps=0.2, dual_clip_c=3.0):
    x, window = _log_ratio(lp, olp)
    loss, grad = _cap(*_ppo(math.exp(x), a, 1 - eps, 1 + eps), a, dual_clip_c)
    return loss, grad * window


def clip_higher(lp, olp, a, *, eps_low=0.2, eps_high=0.28, dual_clip_c=3.0):
    x, window = _log_ratio(lp, olp)
    loss, grad = _cap(*_ppo(math.exp(x), a, 1 - eps_low, 1 + eps_high), a, dual_clip_c)
    return loss, grad * window


def cispo(lp, olp, a, *, eps_low=1.0, eps_high=0.28):
    """-sg[clip(r)] A lp: the gradient is -clip(r) A, through lp directly (no clamp window)."""
    x, _ = _log_ratio(lp, olp)
    w = min(max(math.exp(x), 1 - eps_low), 1 + eps_high)
    return -w * a * lp, -w * a


def entropy_adv(lp, olp, a, *, entropy, eps=0.2, dual_clip_c=3.0, alpha=0.4, kappa=2.0):
    """GRPO (+ cap) on A' = A + min(alpha H, |A| / kappa); H is one float (this token's entropy)."""
    shaped = a + min(alpha * entropy, abs(a) / kappa)
    return grpo(lp, olp, shaped, eps=eps, dual_clip_c=dual_clip_c)


def bapo_batch(lp, olp, adv, mask, *, rho_target=0.5, low_start=0.6, low_max=0.9, low_step=0.05, high_start=1.2,
               high_max=3.0, high_step=0.1, dual_clip_c=3.0):
    """The whole batch [B][T]: walk the bound path until A>0 tokens carry rho_target of
    P + N (P = sum_{A>0} min(r, high) A, N = sum_{A<0} max(r, low) |A|), then GRPO (+ cap) with them.
    Returns (per-token [(loss, grad)], (low, high))."""
    ratios = [[math.exp(_log_ratio(x, y)[0]) for x, y in zip(lr, olr, strict=True)] for lr, olr in zip(lp, olp, strict=True)]
    low, high = low_start, high_start
    while True:
        p = n = 0.0
        for rr, ar, mr in zip(ratios, adv, mask, strict=True):
            for r, a, m in zip(rr, ar, mr, strict=True):
                if m and a > 0:
                    p += min(r, high) * a
                elif m and a < 0:
                    n += max(r, low) * -a
        share = p / (p + n) if p + n > 0 else 1.0
        if share >= rho_target or (low >= low_max - 1e-12 and high >= high_max - 1e-12):
            break
        low, high = min(low + low_step, low_max), min(high + high_step, high_max)
    out = []
    for lr, olr, ar, mr in zip(lp, olp, adv, mask, strict=True):
        row = []
        for x, y, a, m in zip(lr, olr, ar, mr, strict=True):
            if not m:
                row.append((0.0, 0.0))
                continue
            logr, window = _log_ratio(x, y)
            loss, grad = _cap(*_ppo(math.exp(logr), a, low, high), a, dual_clip_c)
            row.append((loss, grad * window))
        out.append(row)
    return out, (low, high)


def dual_clip(lp, olp, a, *, eps=0.2, c=3.0):
    x, window = _log_ratio(lp, olp)
    loss, grad = _ppo(math.exp(x), a, 1 - eps, 1 + eps)
    if a < 0 and loss > -a * c:
        loss, grad = -a * c, 0.0
    return loss, grad * window


def dac(lp, olp, a, *, eps_low=0.16, eps_high=0.2):
    x, window = _log_ratio(lp, olp)
    q = math.exp(olp)
    lo = 0.5 + 0.5 * math.sqrt(max(1 - 4 * eps_low / q, 0.0))
    hi = 0.5 + 0.5 * math.sqrt(1 + 4 * eps_high / q)
    loss, grad = _ppo(math.exp(x), a, lo, hi)
    return loss, grad * window


def sapo(lp, olp, a, *, tau_pos=1.0, tau_neg=1.05):
    x, window = _log_ratio(lp, olp)
    r = math.exp(x)
    tau = tau_pos if a > 0 else tau_neg
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    return -a * s * 4 / tau, -a * 4 * s * (1 - s) * r * window


def gspo_row(lps, olps, advs, masks, *, eps_low=3e-4, eps_high=4e-4):
    """One sample (row): per-token (loss, d loss_t / d lp_t) lists; masked tokens give (0, 0).

    GSPO-token: every token's value is s = exp(mean log r); its gradient is s * A-part through
    its own log-prob only (the sequence mean is a constant), so a sum over the sequence reproduces
    sequence-level GSPO.
    """
    logs = [_log_ratio(lp, olp) for lp, olp in zip(lps, olps, strict=True)]
    kept = [x for (x, _), m in zip(logs, masks, strict=True) if m]
    s = math.exp(sum(kept) / len(kept)) if kept else 1.0
    out = []
    for (_, window), a, m in zip(logs, advs, masks, strict=True):
        if not m:
            out.append((0.0, 0.0))
            continue
        loss, grad = _ppo(s, a, 1 - eps_low, 1 + eps_high)
        out.append((loss, grad * window))
    return out


ELEMENTWISE = {
    "maspo": maspo,
    "grpo": grpo,
    "clip_higher": clip_higher,
    "dual_clip": dual_clip,
    "dac": dac,
    "sapo": sapo,
    "cispo": cispo,
}


def reference(name, lp, olp, adv, mask, **hyper):
    """Nested lists [B][T] of (loss, d loss / d own log-prob) for inputs given as nested lists."""
    if name == "gspo":
        return [gspo_row(lr, olr, ar, mr, **hyper) for lr, olr, ar, mr in zip(lp, olp, adv, mask, strict=True)]
    if name == "bapo":
        return bapo_batch(lp, olp, adv, mask, **hyper)[0]
    if name == "entropy_adv":
        hyper = dict(hyper)
        entropy = hyper.pop("entropy")
        return [
            [entropy_adv(lpv, olpv, av, entropy=hv, **hyper) if mv else (0.0, 0.0)
             for lpv, olpv, av, mv, hv in zip(lr, olr, ar, mr, hr, strict=True)]
            for lr, olr, ar, mr, hr in zip(lp, olp, adv, mask, entropy, strict=True)
        ]
    fn = ELEMENTWISE[name]
    return [
        [fn(lpv, olpv, av, **hyper) if mv else (0.0, 0.0) for lpv, olpv, av, mv in zip(lr, olr, ar, mr, strict=True)]
        for lr, olr, ar, mr in zip(lp, olp, adv, mask, strict=True)
    ]
