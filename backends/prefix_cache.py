"""A prompt-prefix cache for a serving slot loop, as mlx_lm.server and vLLM keep: a prompt
that starts with the tokens of an earlier one (the same system prompt, the earlier turns of a
chat) reuses the keys and values of that shared prefix instead of computing them again.

A position's keys and values depend only on the tokens up to it and on the steering applied
there, so entries are keyed by tokens and by the steering of prompt positions: a prefix
prefilled under `all` or `prompt` steering is reused only under the same vectors. A prompt's
last token is never stored (`response` steering acts on it, and its logits are needed anyway).
Entries are evicted least recently used first, to stay within `max_bytes`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass

from pertoken.backends.base import Steer


@dataclass
class Cached:
    ids: tuple[int, ...]
    kv: object  # the backend's keys and values of these tokens
    nbytes: int


class PrefixCache:
    """LRU over (prompt steering, tokens) -> keys and values, at most `max_bytes` in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.items: OrderedDict[tuple, Cached] = OrderedDict()
        self.nbytes = 0
        self.reused = 0  # prompt tokens not prefilled again, so far

    @staticmethod
    def signature(plan: Steer | None) -> Hashable:
        """What steering the prompt's positions (all but its last) carry."""
        if plan is None or plan.positions == "response" or not plan.terms:
            return None
        digest = hashlib.sha1()
        for row, stages in sorted(plan.stages().items()):  # adds, ablations and caps in order
            digest.update(str(row).encode())
            for st in stages:
                for part in (st.add, st.unit):
                    digest.update(b"-" if part is None else part.tobytes())
                digest.update(f"{st.lo!r},{st.hi!r}".encode())
        return digest.hexdigest()

    def lookup(self, ids: list[int], plan: Steer | None) -> tuple[int, object]:
        """(P, kv): the longest stored prefix shared with ids, at most len(ids) - 1 tokens
        (the last is always prefilled, for its logits); (0, None) when none is."""
        sig, best, hit = self.signature(plan), 0, None
        for key, item in self.items.items():
            if key[0] != sig:
                continue
            n = _common(item.ids, ids)
            if n > best:
                best, hit = n, key
        best = min(best, len(ids) - 1)
        if hit is None or best == 0:
            return 0, None
        self.items.move_to_end(hit)
        self.reused += best
        return best, self.items[hit].kv

    def store(self, ids: list[int], plan: Steer | None, kv: object, nbytes: int) -> None:
        """Keep the keys and values of ids (the prompt less its last token)."""
        key = (self.signature(plan), tuple(ids))
        if not ids or nbytes > self.max_bytes or key in self.items:
            if key in self.items:
                self.items.move_to_end(key)
            return
        self.items[key] = Cached(tuple(ids), kv, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.nbytes -= old.nbytes


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
