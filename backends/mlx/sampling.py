"""Choosing next tokens from logits as transformers' `generate` does: repetition penalty, then
temperature, top-k and top-p, then a draw (argmax at temperature 0); all in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pertoken.backends.base import Sampling, is_greedy

_NEG_INF = float("-inf")


class Sampler:
    """Samples one token per row; remembers the tokens each row has seen for the penalty."""

    def __init__(self, s: Sampling, stop: set[int], uniforms: np.ndarray | None = None):
        # uniforms [B, steps] (per-row seeds): call t draws row b by inverse CDF at
        # uniforms[b, t], so a row's tokens do not depend on its batch
        self.s, self.stop, self.uniforms, self.calls = s, sorted(stop), uniforms, 0
        self.seen: mx.array | None = None  # [B, vocab] bool, only with a penalty
        self.prompt: tuple[mx.array, mx.array] | None = None

    def start(self, ids: mx.array, valid: mx.array) -> None:
        """The prompt tokens (ids, valid [B, T]) count as seen, padding does not."""
        self.prompt = (ids, valid)

    def __call__(self, logits: mx.array, fed: mx.array | None = None) -> mx.array:
        """logits [B, vocab] -> tokens [B]. `fed` [B]: the tokens just fed to the model (None on
        the first step, where stop tokens are barred: an answer has at least one token)."""
        logits = logits.astype(mx.float32)
        V = logits.shape[-1]
        if fed is None:
            bar = np.zeros(V, dtype=bool)
            bar[[t for t in self.stop if t < V]] = True
            logits = mx.where(mx.array(bar), _NEG_INF, logits)
        if self.s.repetition_penalty != 1.0:
            logits = penalize(logits, self._seen(V, fed), self.s.repetition_penalty)
        u = None
        if self.uniforms is not None:  # one extra call when tracing: reuse the last column
            u = self.uniforms[:, min(self.calls, self.uniforms.shape[1] - 1)]
            self.calls += 1
        return choose(logits, self.s, u)

    def _seen(self, V: int, fed: mx.array | None) -> mx.array:
        if self.seen is None:
            ids, valid = (np.array(a) for a in self.prompt)
            seen = np.zeros((ids.shape[0], V), dtype=bool)
            rows = np.broadcast_to(np.arange(ids.shape[0])[:, None], ids.shape)
            seen[rows[valid], ids[valid]] = True
            self.seen = mx.array(seen)
        if fed is not None:
            self.seen = self.seen | (mx.arange(V)[None] == fed[:, None])
        return self.seen


def penalize(logits: mx.array, seen: mx.array, penalty: float) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    penalty, or multiplied when negative."""
    hit = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, hit, logits)


def choose(logits: mx.array, s: Sampling, u: np.ndarray | None = None) -> mx.array:
    """logits [B, vocab] float32 -> token ids [B]; u [B] as in Sampler."""
    if is_greedy(s.temperature):
        return mx.argmax(logits, axis=-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        logits = top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = top_p(logits, s.top_p)
    if u is None:
        return mx.random.categorical(logits)
    cdf = mx.cumsum(mx.softmax(logits, axis=-1), axis=-1)  # [B, vocab]
    target = mx.array(u.astype(np.float32))[:, None] * cdf[:, -1:]
    return mx.minimum(mx.sum(cdf <= target, axis=-1), logits.shape[-1] - 1)  # [B]


def top_k(logits: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens (and any tied with the k-th), as TopKLogitsWarper."""
    k = min(k, logits.shape[-1])
    kth = mx.min(mx.topk(logits, k, axis=-1), axis=-1, keepdims=True)  # [B, 1]
    return mx.where(logits < kth, _NEG_INF, logits)


def top_p(logits: mx.array, p: float) -> mx.array:
    """Drop the least likely tokens whose total probability is at most 1 - p (the most
    likely token always stays), as transformers' TopPLogitsWarper."""
    order = mx.argsort(logits, axis=-1)  # ascending
    cum = mx.cumsum(mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    drop = cum <= 1 - p
    drop = mx.concatenate([drop[:, :-1], mx.zeros_like(drop[:, -1:])], axis=-1)
    drop = mx.put_along_axis(mx.zeros_like(drop), order, drop, axis=-1)
    return mx.where(drop, _NEG_INF, logits)
