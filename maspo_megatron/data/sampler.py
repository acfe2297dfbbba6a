"""A deterministic prompt sampler: a fresh permutation per epoch, resumable mid-epoch.

The order of epoch `e` depends only on (seed, e, number of items), so a run resumed from
`state_dict()` serves exactly the prompts that had not been served yet, in the same order an
uninterrupted run would have.
"""
from __future__ import annotations

import random
from typing import Any, Sequence


class PromptSampler:
    """Hands out dataset indices `batch` at a time, crossing epoch boundaries without a gap."""

    def __init__(self, num_items: int, *, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"PromptSampler: num_items must be >= 1, got {num_items}")
        self.num_items, self.seed, self.shuffle = num_items, seed, shuffle
        self.epoch = 0
        self.position = 0  # next index into this epoch's order
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_items))
        if self.shuffle:
            random.Random(f"maspo-sampler:{self.seed}:{epoch}").shuffle(order)
        return order

    @property
    def served(self) -> int:
        """Indices handed out since epoch 0 began."""
        return self.epoch * self.num_items + self.position

    def next_indices(self, count: int) -> list[int]:
        """The next `count` indices (count may exceed one epoch)."""
        if count < 0:
            raise ValueError(f"PromptSampler.next_indices: count must be >= 0, got {count}")
        indices: list[int] = []
        while len(indices) < count:
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(indices), self.num_items - self.position)
            indices.extend(self._order[self.position : self.position + take])
            self.position += take
        return indices

    def next_items(self, dataset: Sequence[Any], count: int) -> list[Any]:
        """The next `count` items of `dataset` (which must have `num_items` items)."""
        if len(dataset) != self.num_items:
            raise ValueError(f"PromptSampler: dataset has {len(dataset)} items, sampler was built for {self.num_items}")
        return [dataset[i] for i in self.next_indices(count)]

    def state_dict(self) -> dict:
        return {"num_items": self.num_items, "seed": self.seed, "shuffle": self.shuffle, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("num_items", "seed", "shuffle", "epoch", "position"):
            if key not in state:
                raise ValueError(f"sampler state: missing key {key!r}")
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"sampler state: {key}={state[key]!r} in the checkpoint but {getattr(self, key)!r} now (the prompt order would change)")
        if not 0 <= state["position"] <= self.num_items or state["epoch"] < 0:
            raise ValueError(f"sampler state: epoch={state['epoch']} position={state['position']} out of range for {self.num_items} items")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
