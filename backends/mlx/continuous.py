"""Continuous batching for pertoken's MLX models over mlx-lm's `BatchKVCache`: prompts entering
free rows at the same time are prefilled in one left-padded batch; each one's unpadded cache is
appended to the decoding batch by `extend` (left-padded so all rows end together); `filter`
drops rows whose answers ended. The batch never holds more
than `slots` rows, and every decode step advances all of them at once.

Each row carries its prompt's steering, its count of answer tokens (which picks the prompt's
own draw in `uniforms`) and its seen tokens, so a prompt's answer equals its solo run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from pertoken.backends.base import Sampling, Steer
from pertoken.backends.mlx.batch import SteerPlan, step_pass, window_of
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.sampling import choose, penalize
from pertoken.backends.plan import left_pad
from pertoken.backends.schedule import Queue, prefix_keys


@dataclass
class Request:
    """Everything one call asks of the slots."""

    seqs: list[list[int]]
    plans: list[Steer | None]
    uniforms: np.ndarray | None  # [N, max_new_tokens] per-prompt draws; None when greedy
    sampling: Sampling
    max_new_tokens: int
    stop: set[int]
    hidden_size: int
    dtype: mx.Dtype
    chunk: int = CHUNK
    on_answer: Callable[[int, list[int]], None] | None = None  # (prompt, its ids) as each ends


@dataclass
class Prefilled:
    """One prompt after its prefill: its cache (never written again) and last logits."""

    cache: list[BatchKVCache]
    logits: mx.array  # [1, vocab]


class Slots:
    """Up to `slots` rows decoding together; `run` answers a whole request.

    The host reads a step's tokens while the next step runs: that step is queued for every
    row before anyone knows which rows end, and the rows that did end are dropped after it
    (one wasted row-step each), as mlx-lm's batch generator does."""

    def __init__(self, model, req: Request, slots: int):
        self.model, self.req, self.slots = model, req, slots
        self.window = window_of(model)
        self.cache: list[BatchKVCache] | None = None  # one per block, a row per prompt
        self.rows: list[int] = []  # the prompt of each row
        self.count: list[int] = []  # answer tokens of each row read so far
        self.seen: mx.array | None = None  # [rows, vocab] bool, only with a penalty
        self.steer: dict = {}  # Pass fields for the rows as they stand
        self.answers: list[list[int]] = [[] for _ in req.seqs]
        self.queue: Queue[Prefilled] = Queue(
            prefix_keys(req.seqs, req.plans), [len(q) for q in req.seqs]
        )

    def run(self) -> list[list[int]]:
        tokens = self._fill(None)  # [rows] the tokens each row feeds next, not yet read
        while self.rows:
            ahead = self._draw(self._step(tokens), start=0, ahead=1)  # the step after
            mx.async_eval(ahead)
            keep = [self._take(r, t) for r, t in enumerate(tokens.tolist())]
            tokens = self._fill(self._keep(keep, ahead))
        return self.answers

    # ---------------------------------------------------------------- admission
    def _fill(self, tokens: mx.array | None) -> mx.array | None:
        """Admit waiting prompts into free rows, prefilled together; `tokens` [rows] gains
        each new row's first token, drawn from its prefill's logits."""
        added = False
        while self.queue and len(self.rows) < self.slots:
            taken = self.queue.take(self.slots - len(self.rows), self._prefill)
            start = len(self.rows)
            for i, pre in taken:
                self._append(i, pre)
            logits = mx.concatenate([pre.logits for _, pre in taken])  # [len(taken), vocab]
            first = self._draw(logits, start=start, first=True)
            tokens = first if tokens is None else mx.concatenate([tokens, first])
            added = True
        if added:
            self._steering()
        return tokens

    def _prefill(self, idx: list[int]) -> list[Prefilled]:
        """These prompts in one left-padded batch, each with its own steering; each comes out
        with its own unpadded one-row cache."""
        seqs, plans = [self.req.seqs[i] for i in idx], [self.req.plans[i] for i in idx]
        batch = left_pad(seqs, 0)  # the pad id is never attended to
        kw = {}
        sp = SteerPlan.per_row(plans, self.req.hidden_size, self.req.dtype)
        if sp is not None:
            kw = {"steer": sp.vectors, "steer_on": sp.prefill_on(batch)}
        pads = batch.pad.tolist()
        cache = [BatchKVCache(pads) for _ in self.model.layers]
        logits = prefill(self.model, batch, chunk=self.req.chunk, cache=cache, head="last", **kw)
        mx.eval(logits, [c.state for c in cache])
        return [
            Prefilled([_row(c, b, p) for c in cache], logits[b : b + 1, -1])
            for b, p in enumerate(pads)
        ]

    def _append(self, i: int, pre: Prefilled) -> None:
        if self.cache is None:
            self.cache = [_empty() for _ in pre.cache]
        for mine, theirs in zip(self.cache, pre.cache, strict=True):
            mine.extend(theirs)  # new arrays: the prefill stays as it was for its siblings
        self.rows.append(i)
        self.count.append(0)
        if self.req.sampling.repetition_penalty != 1.0:
            V = pre.logits.shape[-1]
            row = np.zeros((1, V), dtype=bool)
            row[0, self.req.seqs[i]] = True
            new = mx.array(row)
            self.seen = new if self.seen is None else mx.concatenate([self.seen, new])

    def _steering(self) -> None:
        """Each steered row's vector [rows, 1, hidden] and where it acts ([rows, 1, 1])."""
        plans = [self.req.plans[i] for i in self.rows]
        sp = SteerPlan.per_row(plans, self.req.hidden_size, self.req.dtype)
        self.steer = {}
        if sp is not None:
            on = np.array([p is not None and p.positions != "prompt" for p in plans], np.float32)
            self.steer = {"steer": sp.vectors, "steer_on": mx.array(on[:, None, None])}
            self.steer["steer_on"] = self.steer["steer_on"].astype(self.req.dtype)

    # ---------------------------------------------------------------- decoding
    def _step(self, tokens: mx.array) -> mx.array:
        """Each row feeds its token (tokens [rows]) -> logits [rows, vocab]."""
        c = self.cache[0]
        S = c._idx + 1  # keys once this step's are written
        valid = mx.arange(S)[None] >= c.left_padding[:, None]  # [rows, S]
        p = step_pass(valid, c.offset, self.window, head="last", **self.steer)
        return self.model(tokens[:, None], self.cache, p)[:, -1]

    def _draw(self, logits: mx.array, start: int, ahead: int = 0, first=False) -> mx.array:
        """Tokens [n] of rows start.. (not read yet) from their logits [n, vocab]: each row's
        draw `ahead` past the tokens read so far."""
        rows = range(start, len(self.rows))
        s, V = self.req.sampling, logits.shape[-1]
        logits = logits.astype(mx.float32)
        if first:  # an answer has at least one token
            bar = np.zeros(V, dtype=bool)
            bar[[t for t in self.req.stop if t < V]] = True
            logits = mx.where(mx.array(bar), float("-inf"), logits)
        if self.seen is not None:
            logits = penalize(logits, self.seen[start:], s.repetition_penalty)
        u = None
        if self.req.uniforms is not None and s.temperature > 0:
            u = np.array([self._u(r, ahead) for r in rows])
        tokens = choose(logits, s, u)
        if self.seen is not None:
            self.seen[start:] = self.seen[start:] | (mx.arange(V)[None] == tokens[:, None])
        return tokens

    def _u(self, r: int, ahead: int) -> float:
        k = self.count[r] + ahead  # a row ending before it never reads this draw
        return self.req.uniforms[self.rows[r], k] if k < self.req.max_new_tokens else 0.5

    def _take(self, r: int, token: int) -> bool:
        """Row r drew `token`; False when its answer has ended (a stop, or the last token)."""
        i = self.rows[r]
        if token not in self.req.stop:
            self.answers[i].append(token)
            self.count[r] += 1
            if self.count[r] < self.req.max_new_tokens:
                return True
        if self.req.on_answer is not None:
            self.req.on_answer(i, self.answers[i])
        return False

    def _keep(self, keep: list[bool], tokens: mx.array) -> mx.array | None:
        """Drop the rows whose answers ended, and their entries of `tokens` [rows]."""
        if all(keep):
            return tokens
        idx = [r for r, k in enumerate(keep) if k]
        self.rows, self.count = [self.rows[r] for r in idx], [self.count[r] for r in idx]
        if not idx:
            self.cache = self.seen = None
            self.steer = {}
            return None
        at = mx.array(idx)
        for c in self.cache:
            c.filter(at)
        if self.seen is not None:
            self.seen = self.seen[at]
        self._steering()
        return tokens[at]


def _row(c: BatchKVCache, b: int, pad: int) -> BatchKVCache:
    """Row b of a prefilled cache as a one-row cache of its own, without its padding."""
    one = BatchKVCache([0])
    one.keys, one.values = c.keys[b : b + 1, :, pad : c._idx], c.values[b : b + 1, :, pad : c._idx]
    one._idx = c._idx - pad
    one.offset = mx.array([one._idx])
    return one


def _empty() -> BatchKVCache:
    """A cache of no rows that `extend` can grow (integer padding and offsets)."""
    c = BatchKVCache([0])
    c.left_padding = c.left_padding[:0]
    c.offset = c.offset[:0]
    return c
