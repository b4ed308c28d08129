"""Choosing next tokens from logits as transformers' `generate` does, each slot with its own
settings: logit bias, repetition penalty, then temperature, top-k and top-p, then a draw by
inverse CDF at the slot's own uniform (argmax for greedy slots); all in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

_NEG_INF = float("-inf")


def penalize(logits: mx.array, seen: mx.array, penalty: mx.array) -> mx.array:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    penalty, or multiplied when negative (penalty [n, 1], one per slot)."""
    hit = mx.where(logits < 0, logits * penalty, logits / penalty)
    return mx.where(seen, hit, logits)


def choose(logits: mx.array, samplings: list, u: np.ndarray) -> mx.array:
    """logits [n, vocab] float32 -> token ids [n]: slot j by samplings[j] at its draw u[j]."""
    greedy = np.array([s.greedy for s in samplings])
    best = mx.argmax(logits, axis=-1)
    if greedy.all():
        return best
    temp = np.array([1.0 if s.greedy else s.temperature for s in samplings], np.float32)
    scaled = logits / mx.array(temp)[:, None]
    k = np.array([s.top_k for s in samplings])
    if (k > 0).any():
        scaled = top_k(scaled, k)
    p = np.array([s.top_p for s in samplings], np.float32)
    if (p < 1).any():
        scaled = top_p(scaled, p)
    cdf = mx.cumsum(mx.softmax(scaled, axis=-1), axis=-1)  # [n, vocab]
    target = mx.array(u.astype(np.float32))[:, None] * cdf[:, -1:]
    drawn = mx.minimum(mx.sum(cdf <= target, axis=-1), logits.shape[-1] - 1)  # [n]
    return mx.where(mx.array(greedy), best, drawn)


def top_k(logits: mx.array, k: np.ndarray) -> mx.array:
    """Keep each slot's k most likely tokens (and any tied with the k-th), as
    TopKLogitsWarper; k [n], 0 keeps every token."""
    V = logits.shape[-1]
    ranked = -mx.sort(-logits, axis=-1)  # [n, vocab] descending
    at = mx.array(np.clip(k, 1, V) - 1)[:, None]
    kth = mx.take_along_axis(ranked, at, axis=-1)  # [n, 1]
    kth = mx.where(mx.array(k > 0)[:, None], kth, _NEG_INF)
    return mx.where(logits < kth, _NEG_INF, logits)


def top_p(logits: mx.array, p: np.ndarray) -> mx.array:
    """Drop each slot's least likely tokens whose total probability is at most 1 - p (the most
    likely token always stays), as transformers' TopPLogitsWarper; p [n]."""
    order = mx.argsort(logits, axis=-1)  # ascending
    cum = mx.cumsum(mx.softmax(mx.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
    drop = (cum <= mx.array(1 - p)[:, None]) & mx.array(p < 1)[:, None]
    drop = mx.concatenate([drop[:, :-1], mx.zeros_like(drop[:, -1:])], axis=-1)
    drop = mx.put_along_axis(mx.zeros_like(drop), order, drop, axis=-1)
    return mx.where(drop, _NEG_INF, logits)
