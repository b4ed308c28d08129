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
from pertoken.backends.mlx.batch import Batch, SteerPlan, step_pass, window_of
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.sampling import Sampler

# (batch row, answer token index, token id, hidden [len(rows), hidden] float32)
HiddenCallback = Callable[[int, int, int, np.ndarray], None]


@dataclass
class Answer:
    ids: list[int] = field(default_factory=list)
    hidden: list[np.ndarray] = field(default_factory=list)  # per token [len(rows), hidden]


class Grab:
    """Keeps the last position of chosen rows during one forward."""

    def __init__(self, rows: list[int]):
        self.rows, self.got = rows, {}

    def __call__(self, row: int, h: mx.array) -> None:
        if row in self.rows:
            self.got[row] = h[:, -1].astype(mx.float32)  # [B, hidden]

    def stacked(self) -> mx.array:
        return mx.stack([self.got[r] for r in self.rows], axis=1)  # [B, R, hidden]


def decode(
    model,
    batch: Batch,
    *,
    prompt_lens: np.ndarray,
    max_new_tokens: int,
    sampling: Sampling,
    stop: set[int],
    steer: SteerPlan | None = None,
    rows: list[int] | None = None,
    on_hidden: HiddenCallback | None = None,
    chunk: int = CHUNK,
    uniforms: np.ndarray | None = None,
) -> list[Answer]:
    """Generate up to `max_new_tokens` per row; stop tokens end a row and are not kept.

    With `rows`, each answer token's hidden state at those rows is captured at the token's
    own position (one extra forward when `max_new_tokens` ends an answer). The prompts are
    prefilled `chunk` tokens at a time. uniforms [B, steps]: per-row draws (see Sampler)."""
    B, T = batch.ids.shape
    answers = [Answer() for _ in range(B)]
    if max_new_tokens <= 0:
        return answers
    window = window_of(model)
    cache = [KVCache() for _ in model.layers]
    pre, dec = {}, {}
    if steer is not None:
        pre = {"steer": steer.vectors, "steer_on": steer.prefill_on(batch, prompt_lens)}
        dec = {} if steer.positions == "prompt" else {"steer": steer.vectors}
    sample = Sampler(sampling, stop, uniforms)
    sample.start(batch.ids, batch.valid)
    logits = prefill(model, batch, chunk=chunk, cache=cache, head="last", **pre)
    y = sample(logits[:, -1])  # [B]
    state = {"valid": batch.valid, "offset": batch.offset + T}

    def step(tokens: mx.array) -> tuple[mx.array, mx.array | None]:
        state["valid"] = mx.concatenate([state["valid"], mx.ones((B, 1), dtype=mx.bool_)], 1)
        grab = Grab(rows) if rows else None
        p = step_pass(state["valid"], state["offset"], window, head="last", observe=grab, **dec)
        out = model(tokens[:, None], cache, p)
        state["offset"] = state["offset"] + 1
        return sample(out[:, -1], tokens), grab.stacked() if grab else None

    return _loop(y, step, answers, max_new_tokens, stop, bool(rows), on_hidden)


def _loop(y, step, answers, max_new_tokens, stop, capture, on_hidden) -> list[Answer]:
    B = len(answers)
    done = np.zeros(B, dtype=bool)
    kept_prev, h_cur = None, None
    stop_arr = np.array(sorted(stop), dtype=np.int64)
    mx.async_eval(y)
    for n in range(max_new_tokens):
        nxt = step(y) if (n + 1 < max_new_tokens or capture) else None
        if nxt is not None:
            mx.async_eval(*[a for a in nxt if a is not None])
        ids = np.array(y.tolist(), dtype=np.int64)
        if h_cur is not None:
            _emit(answers, np.array(h_cur), kept_prev, on_hidden)
        kept = ~done & ~np.isin(ids, stop_arr)
        done |= ~kept
        for b in np.flatnonzero(kept):
            answers[b].ids.append(int(ids[b]))
        kept_prev = kept
        if done.all():
            return answers
        if nxt is not None:
            y, h_cur = nxt
    if capture:  # the last kept tokens' states come from the extra forward
        _emit(answers, np.array(h_cur), kept_prev, on_hidden)
    return answers


def _emit(answers, h: np.ndarray, kept: np.ndarray, on_hidden) -> None:
    for b in np.flatnonzero(kept):
        a = answers[b]
        a.hidden.append(h[b])
        if on_hidden is not None:
            i = len(a.hidden) - 1
            on_hidden(int(b), i, a.ids[i], h[b])
