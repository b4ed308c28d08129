"""What continuous batching decides in numpy, for both backends: the order in which prompts
enter free slots, which of them are prefilled together or share one prefill, and a seed per
prompt.

A slot decodes one prompt at a time; when its answer ends, the next prompt in the queue is
prefilled into it while the other slots keep decoding. Each prompt keeps its own steering plan
and its own stream of draws, so its answer does not depend on which prompts shared the slots.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import numpy as np

from pertoken.errors import PertokenError

SCHEDULES = ("continuous", "static")
P = TypeVar("P")  # a backend's prefilled prompt: its KV cache and last logits


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise PertokenError(f"schedule must be one of {SCHEDULES}, not {schedule!r}")
    return schedule


def check_slots(slots: int) -> int:
    if slots < 1:
        raise PertokenError(f"batch size must be at least 1, not {slots}")
    return slots


def prompt_seeds(seed: int, n: int) -> list[int]:
    """One seed per prompt from the call's seed; prompt i's depends on (seed, i) alone, so a
    seeded call samples the same answers however its prompts are batched."""
    return [int(np.random.SeedSequence([int(seed), i]).generate_state(1)[0]) for i in range(n)]


class Queue(Generic[P]):
    """Prompts waiting for a slot. Prompts with the same key (token ids and steering plan: the
    samples of one question) are queued together and share one prefill, held until the last
    of them has entered a slot."""

    def __init__(self, keys: Sequence[Hashable], sizes: Sequence[int] | None = None):
        first: dict[Hashable, int] = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        self.keys = list(keys)
        # shortest prompts first (`sizes`: token counts), so a batch of admissions is padded
        # little; samples of one key stay together, in the order given
        size = sizes if sizes is not None else [0] * len(keys)
        order = sorted(range(len(keys)), key=lambda i: (size[first[keys[i]]], first[keys[i]]))
        self.order = deque(order)
        self.left = Counter(self.keys)  # prompts of each key not yet in a slot
        self.held: dict[Hashable, P] = {}
        self.prefills = 0  # prefill passes run (one per distinct key)

    def __bool__(self) -> bool:
        return bool(self.order)

    def take(self, k: int, prefill: Callable[[list[int]], list[P]]) -> list[tuple[int, P]]:
        """Up to k (prompt index, its prefill) pairs, in queue order. `prefill(indices)` runs
        once, over the first prompt of each key not yet prefilled, as one batch."""
        taken = [self.order.popleft() for _ in range(min(k, len(self.order)))]
        firsts: dict[Hashable, int] = {}  # key -> its first prompt among those taken
        for i in taken:
            if self.keys[i] not in self.held:
                firsts.setdefault(self.keys[i], i)
        if firsts:
            self.held.update(zip(firsts, prefill(list(firsts.values())), strict=True))
            self.prefills += len(firsts)
        out = []
        for i in taken:
            key = self.keys[i]
            out.append((i, self.held[key]))
            self.left[key] -= 1
            if not self.left[key]:
                del self.held[key]
        return out


class Answers:
    """Each prompt's decoded answer, handed to `on_answer` as soon as it ends (a caller saves
    finished rows while the slots go on)."""

    def __init__(self, n: int, decode: Callable[[list[int]], str], on_answer=None):
        self.texts: list[str] = [""] * n
        self.decode, self.on_answer = decode, on_answer

    def end(self, i: int, ids: list[int]) -> None:
        self.texts[i] = self.decode(ids)
        if self.on_answer is not None:
            self.on_answer(i, self.texts[i])


def prefix_keys(seqs: Sequence[Sequence[int]], plans: Sequence[object]) -> list[tuple]:
    """The key under which a prompt's prefill is shared: its token ids and its plan object
    (two plans equal in value but distinct objects are not merged; a prefill is steered)."""
    return [(tuple(s), id(p)) for s, p in zip(seqs, plans, strict=True)]
