"""Prefill in chunks: an input goes through the model `chunk` tokens at a time into a KV cache,
so attention never holds more than [chunk, T] scores or mask entries, whatever T is. When no
slot is padded, full-attention layers use the fused kernel's causal mode and get no mask array."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
from mlx_lm.models.cache import KVCache

from pertoken.backends.mlx.batch import ids_of, offset_of, valid_of, window_of
from pertoken.backends.mlx.models.residual import Observer, Pass, attend_mask
from pertoken.backends.plan import PaddedBatch

CHUNK = 512  # input tokens per forward


def prefill(
    model,
    batch: PaddedBatch,
    *,
    chunk: int = CHUNK,
    cache: list | None = None,
    head: str = "last",
    steer: dict[int, mx.array] | None = None,
    steer_on: mx.array | None = None,
    observe: Callable[[int], Observer] | None = None,
    hold: Callable[[], list[mx.array]] | None = None,
) -> mx.array | None:
    """Run all of `batch` through `model`, filling `cache` (a fresh one when None).

    head "all": logits [B, T, vocab]; "last": [B, 1, vocab] of the last position; "none": None.
    steer_on [B, T, 1] is cut per chunk; observe(start) gives the Observer of the chunk that
    starts at `start`; hold() lists arrays the caller accumulates over chunks: they are
    evaluated with the cache after each chunk, so no chunk's graph outlives it."""
    B, T = batch.ids.shape
    cache = cache if cache is not None else [KVCache() for _ in model.layers]
    window, ids, valid, offset = window_of(model), ids_of(batch), valid_of(batch), offset_of(batch)
    causal = not batch.pad.any()  # the fused kernel's causal mode needs no padding
    outs = []
    for s in range(0, T, chunk):
        e = min(s + chunk, T)
        p = Pass(
            offset=offset + s,
            mask="causal" if causal else attend_mask(valid[:, :e], e - s),
            window_mask=attend_mask(valid[:, :e], e - s, window) if window else None,
            steer=steer or {},
            steer_on=None if steer_on is None else steer_on[:, s:e],
            observe=observe(s) if observe else None,
            head=head if head == "all" or e == T else "none",
        )
        out = model(ids[:, s:e], cache, p)  # [B, e - s or 1, vocab] or None
        if out is not None:
            outs.append(out)
        if e < T:
            mx.eval([c.state for c in cache], outs, hold() if hold else [])
    if head == "all":
        return mx.concatenate(outs, axis=1)
    return outs[-1] if outs else None
