"""Per-sample means of every row, accumulated inside the forward (never all rows' states)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pertoken.backends.mlx.batch import Batch
from pertoken.backends.mlx.prefill import CHUNK, prefill


def mean_weights(batch: Batch, prompt_lens: np.ndarray) -> np.ndarray:
    """[B, 3, T] float32: prompt_avg, prompt_last and response_avg weights per position."""
    B, T = batch.ids.shape
    w = np.zeros((B, 3, T), dtype=np.float32)
    for b in range(B):
        p, n = int(batch.pad[b]), int(batch.lens[b])
        P = min(int(prompt_lens[b]), n)
        if P > 0:
            w[b, 0, p : p + P] = 1.0 / P
            w[b, 1, p + P - 1] = 1.0
        if n > P:
            w[b, 2, p + P : p + n] = 1.0 / (n - P)
    return w


def summarize(model, batch: Batch, prompt_lens: np.ndarray, chunk: int = CHUNK) -> np.ndarray:
    """[B, n_layers + 1, 3, hidden] float32; empty spans give NaN. The input goes through
    the model `chunk` tokens at a time, each chunk adding its share of the means."""
    weights = mean_weights(batch, prompt_lens)
    w = mx.array(weights)  # [B, 3, T]
    acc: dict[int, mx.array] = {}

    def observe(start: int):
        def see(row: int, h: mx.array) -> None:  # h [B, L, hidden] of this chunk
            part = w[:, :, start : start + h.shape[1]] @ h.astype(mx.float32)  # [B, 3, hidden]
            acc[row] = acc[row] + part if row in acc else part

        return see

    prefill(model, batch, chunk=chunk, head="none", observe=observe, hold=lambda: [*acc.values()])
    out = mx.stack([acc[r] for r in sorted(acc)], axis=1)  # [B, rows, 3, hidden]
    out = np.array(out)
    empty = weights.sum(axis=2) == 0  # [B, 3]
    out[np.broadcast_to(empty[:, None, :, None], out.shape)] = np.nan
    return out
