"""Per-sample means of every row, accumulated inside the forward (never all rows' states)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.plan import PaddedBatch


def summarize(model, batch: PaddedBatch, chunk: int = CHUNK) -> np.ndarray:
    """[B, n_layers + 1, 3, hidden] float32; empty spans give NaN. The input goes through
    the model `chunk` tokens at a time, each chunk adding its share of the means."""
    w = mx.array(batch.summary_weights())  # [B, 3, T]
    acc: dict[int, mx.array] = {}

    def observe(start: int):
        def see(row: int, h: mx.array) -> None:  # h [B, L, hidden] of this chunk
            part = w[:, :, start : start + h.shape[1]] @ h.astype(mx.float32)  # [B, 3, hidden]
            acc[row] = acc[row] + part if row in acc else part

        return see

    prefill(model, batch, chunk=chunk, head="none", observe=observe, hold=lambda: [*acc.values()])
    return np.array(mx.stack([acc[r] for r in sorted(acc)], axis=1))  # [B, rows, 3, hidden]
