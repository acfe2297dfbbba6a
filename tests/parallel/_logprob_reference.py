"""The float64 reference the log-prob + entropy tests (torch chunked, Triton, fused output layer) share."""
import torch


def reference(logits64, target, temperature, w_lp, w_ent):
    """fp64 log_prob[T], entropy[T] and d(sum w_lp log_prob + sum w_ent entropy)/dlogits[T, V]."""
    logits = logits64.clone().requires_grad_()
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    log_prob = log_probs.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    loss = 0.0
    if w_lp is not None:
        loss = loss + (log_prob * w_lp).sum()
    if w_ent is not None:
        loss = loss + (entropy * w_ent).sum()
    loss.backward()
    return log_prob.detach(), entropy.detach(), logits.grad


def rel_err(value, ref):
    return float((value.double() - ref).norm() / ref.norm().clamp_min(1e-30))
