"""Verifiable rewards: math-verify in isolated worker processes, a registry for user rewards.

    from maspo_megatron.rewards import score_batch, RewardScorer
    results = score_batch("math", responses, ground_truths, timeout_s=5)   # [RewardResult(reward, reason)]
"""
from maspo_megatron.rewards.extract import extract_answer
from maspo_megatron.rewards.math_reward import math_reward
from maspo_megatron.rewards.registry import RewardError, get_reward, register_reward, registered_rewards
from maspo_megatron.rewards.result import RewardResult, RewardSample
from maspo_megatron.rewards.scorer import RewardScorer, score_batch

__all__ = [
    "RewardError", "RewardResult", "RewardSample", "RewardScorer", "extract_answer", "get_reward", "math_reward",
    "register_reward", "registered_rewards", "score_batch",
]
