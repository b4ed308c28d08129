"""Batched generation over a left-padded batch: per-row stopping, steering, optional capture.

Like mlx-lm's `generate_step`, the next forward is queued before the current token is read,
so host work overlaps the device; captured states therefore arrive one step after sampling."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from pertoken.backends.base import Sampling
from pertoken.backends.mlx.batch import SteerPlan, ids_of, offset_of, step_pass, valid_of, window_of
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.sampling import Sampler
from pertoken.backends.plan import PaddedBatch

# (batch row, answer token index, token id, hidden [len(rows), hidden] float32 or None,
#  (logprob, [(id, logprob), ...] or None) or None) -> False to end that row's answer
Report = Callable[[int, int, int, np.ndarray | None, tuple | None], bool | None]
# Called once after each step's reports.
Flush = Callable[[], None]


@dataclass
class Answer:
    ids: list[int] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)  # per token [len(rows), hidden]
    reported: int = 0


class Grab:
    """Keeps the last position of chosen rows during one forward."""

    def __init__(self, rows: list[int]):
        self.rows, self.got = rows, {}

    def __call__(self, row: int, h: mx.array) -> None:
        if row in self.rows:
            self.got[row] = h[:, -1].astype(mx.float32)  # [B, hidden]

    def stacked(self) -> mx.array:
        return mx.stack([self.got[r] for r in self.rows], axis=1)  # [B, R, hidden]


def logprobs_of(logits: mx.array, tokens: mx.array, k: int | None):
    """(chosen [B], top ids [B, k], top logprobs [B, k]) from logits [B, vocab]; None when k is."""
    if k is None:
        return None
    logits = logits.astype(mx.float32)
    lp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)  # [B, vocab]
    chosen = mx.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    if k == 0:
        return chosen, None, None
    top = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]  # [B, k], unordered
    return chosen, top, mx.take_along_axis(lp, top, axis=-1)


def decode(
    model,
    batch: PaddedBatch,
    *,
    max_new_tokens: int,
    sampling: Sampling,
    stop: set[int],
    steer: SteerPlan | None = None,
    rows: list[int] | None = None,
    report: Report | None = None,
    logprobs: int | None = None,
    chunk: int = CHUNK,
    uniforms: np.ndarray | None = None,
    flush: Flush | None = None,
) -> list[Answer]:
    """Generate up to `max_new_tokens` per row; stop tokens end a row and are not kept.

    With `rows`, each answer token's hidden state at those rows is captured at the token's
    own position (one extra forward when `max_new_tokens` ends an answer). `report` hears of
    every answer token (after its hidden state, when captured) and may end its row. The prompts
    are prefilled `chunk` tokens at a time. uniforms [B, steps]: per-row draws (see Sampler)."""
    B, T = batch.ids.shape
    answers = [Answer() for _ in range(B)]
    if max_new_tokens <= 0:
        return answers
    window = window_of(model)
    cache = [KVCache() for _ in model.layers]
    pre, dec = {}, {}
    if steer is not None:
        pre = {"steer": steer.vectors, "steer_on": steer.prefill_on(batch)}
        dec = steer.step_kw(B)
    sample = Sampler(sampling, stop, uniforms)
    valid = valid_of(batch)
    sample.start(ids_of(batch), valid)
    logits = prefill(model, batch, chunk=chunk, cache=cache, head="last", **pre)
    y = sample(logits[:, -1])  # [B]
    first = (y, None, logprobs_of(logits[:, -1], y, logprobs))
    state = {"valid": valid, "offset": offset_of(batch) + T}

    def step(tokens: mx.array) -> tuple:
        state["valid"] = mx.concatenate([state["valid"], mx.ones((B, 1), dtype=mx.bool_)], 1)
        grab = Grab(rows) if rows else None
        p = step_pass(state["valid"], state["offset"], window, head="last", observe=grab, **dec)
        out = model(tokens[:, None], cache, p)[:, -1]
        state["offset"] = state["offset"] + 1
        nxt = sample(out, tokens)
        return nxt, grab.stacked() if grab else None, logprobs_of(out, nxt, logprobs)

    return _Loop(answers, stop, bool(rows), report, flush).run(first, step, max_new_tokens)


class _Loop:
    """The host side of decoding: reads each step's tokens while the next forward runs."""

    def __init__(self, answers: list[Answer], stop: set[int], capture: bool, report, flush=None):
        self.answers, self.capture, self.report, self.flush = answers, capture, report, flush
        self.stop_ids = np.array(sorted(stop), dtype=np.int64)
        self.done = np.zeros(len(answers), dtype=bool)
        self.ended = np.zeros(len(answers), dtype=bool)  # rows whose report asked to stop

    def run(self, cur: tuple, step, max_new_tokens: int) -> list[Answer]:
        held = None  # (kept, logprobs) of tokens whose hidden states are still in flight
        mx.async_eval(*_arrays(cur))
        for n in range(max_new_tokens):
            nxt = step(cur[0]) if (n + 1 < max_new_tokens or self.capture) else None
            if nxt is not None:
                mx.async_eval(*_arrays(nxt))
            ids = np.array(cur[0].tolist(), dtype=np.int64)
            if held is not None:  # the previous tokens' states came with this step
                self._emit(*held, np.array(cur[1]))
            kept = self._keep(ids)
            lps = _host(cur[2])
            if self.capture:
                held = (kept, lps)
            else:
                self._emit(kept, lps, None)
            if (self.done | self.ended).all():
                return self.answers
            if nxt is not None:
                cur = nxt
        if held is not None:  # the last kept tokens' states come from the extra forward
            self._emit(*held, np.array(cur[1]))
        return self.answers

    def _keep(self, ids: np.ndarray) -> np.ndarray:
        kept = ~(self.done | self.ended) & ~np.isin(ids, self.stop_ids)
        self.done |= ~kept
        for b in np.flatnonzero(kept):
            self.answers[b].ids.append(int(ids[b]))
        return kept

    def _emit(self, kept: np.ndarray, lps, h: np.ndarray | None) -> None:
        for b in np.flatnonzero(kept):
            a = self.answers[b]
            i = a.reported
            a.reported += 1
            if h is not None:
                a.hidden.append(h[b])
            if self.report is not None:
                lp = (
                    None
                    if lps is None
                    else (float(lps[0][b]), None if lps[1] is None else lps[1][b])
                )
                if self.report(int(b), i, a.ids[i], None if h is None else h[b], lp) is False:
                    self.ended[b] = True
        if self.flush is not None:
            self.flush()


def _arrays(step: tuple) -> list[mx.array]:
    y, h, lp = step
    return [a for a in (y, h, *(lp or ())) if a is not None]


def _host(lp) -> tuple | None:
    """Logprobs on the host: (chosen [B], per row [(id, logprob), ...] best first, or None)."""
    if lp is None:
        return None
    chosen, top, top_lp = lp
    if top is None:
        return np.array(chosen), None
    ids, vals = np.array(top), np.array(top_lp)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids, vals = np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)
    return np.array(chosen), [list(zip(i.tolist(), v.tolist())) for i, v in zip(ids, vals)]
