"""Reward functions the pool tests send to worker processes (module level, so they pickle by name)."""
import asyncio
import os
import signal
import time

from maspo_megatron.rewards import RewardResult, register_reward


def exact_match(response, ground_truth, metadata):
    return 1.0 if response.strip() == str(ground_truth) else 0.0


def uses_metadata(response, ground_truth, metadata, *, bonus=0.0):
    return RewardResult(float(metadata["weight"]) + bonus, f"weighted {metadata['id']}")


@register_reward("test_length_reward")
def length_reward(response, ground_truth, metadata):
    return len(response), "length"


def misbehaving(response, ground_truth, metadata):
    """Normal answers score 1; special responses crash, hang past signals, or eat memory."""
    if response == "exit":
        os._exit(3)
    if response == "ignore-signals":
        # What C code stuck in a bignum power looks like from outside: the in-worker timer never fires.
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        time.sleep(60)
    if response == "hog":
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])
        hoard = b"x" * (400 * 1024 * 1024)  # filled, so resident, not just reserved
        time.sleep(60)
        return len(hoard)
    if response == "raise":
        raise KeyError("boom")
    if response == "sleep":
        time.sleep(60)  # interruptible: the in-worker timer answers
    return 1.0, f"ok pid {os.getpid()}"


async def remote_verifier(response, ground_truth, metadata):
    """Stands in for an HTTP verifier: awaits, then answers (or never answers)."""
    if response == "hang":
        await asyncio.sleep(60)
    await asyncio.sleep(0.2)
    return 1.0 if response == ground_truth else 0.0
