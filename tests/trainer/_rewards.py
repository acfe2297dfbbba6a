"""Reward functions used by the trainer tests (imported by path: tests.trainer._rewards:NAME)."""


def raising_reward(response, ground_truth, metadata=None):
    """Raises on about half of the responses: the scorer must report it, the run must go on."""
    if sum(map(ord, response)) % 2:
        raise RuntimeError("this reward function is broken on purpose")
    return 1.0


def constant_reward(response, ground_truth, metadata=None):
    """Every sample of every group gets the same reward: dynamic sampling drops every group."""
    return 1.0
