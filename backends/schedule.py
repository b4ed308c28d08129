"""What continuous batching decides in numpy, for both backends: which waiting entries enter
free slots, which of them share one prefill, and a seed per prompt.

A slot decodes one entry at a time; when its answer ends, the next waiting entry is prefilled
into it while the other slots keep decoding. Each entry keeps its own steering plan and its own
stream of draws, so its answer does not depend on which entries shared the slots.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import numpy as np

from pertoken.errors import PertokenError

P = TypeVar("P")  # a backend's prefilled prompt: its KV cache and last logits


def check_slots(slots: int) -> int:
    if slots < 1:
        raise PertokenError(f"batch size must be at least 1, not {slots}")
    return slots


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One seed per prompt from the call's seed; prompt i's depends on (seed, i) alone, so a
    seeded call samples the same answers however its prompts are batched."""
    return [int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]) for i in range(n)]


class Waiting(Generic[P]):
    """Entries waiting for a slot, in the order inserted. Entries with the same key (token
    ids and steering plan: the samples of one question) share one prefill, held until the
    last of them waiting has entered a slot."""

    def __init__(self):
        self.order: deque = deque()
        self.left: Counter = Counter()  # waiting entries of each key
        self.held: dict[Hashable, P] = {}
        self.prefills = 0  # prefill passes run (one per distinct key)

    def __bool__(self) -> bool:
        return bool(self.order)

    def add(self, entry) -> None:
        self.order.append(entry)
        self.left[entry.key] += 1

    def take(self, k: int, prefill: Callable[[list], list[P]]) -> list[tuple[object, P]]:
        """Up to k (entry, its prefill) pairs, in order, skipping cancelled entries.
        `prefill(entries)` runs once, over the first entry of each key not yet prefilled."""
        taken = []
        while self.order and len(taken) < k:
            e = self.order.popleft()
            self.left[e.key] -= 1
            if e.cancelled:
                e.on_end(e)
            else:
                taken.append(e)
        firsts: dict[Hashable, object] = {}  # key -> its first entry among those taken
        for e in taken:
            if e.key not in self.held:
                firsts.setdefault(e.key, e)
        if firsts:
            self.held.update(zip(firsts, prefill(list(firsts.values())), strict=True))
            self.prefills += len(firsts)
        out = [(e, self.held[e.key]) for e in taken]
        for e in taken:
            if not self.left[e.key]:
                self.held.pop(e.key, None)
        return out
