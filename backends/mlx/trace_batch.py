"""Per-token projections of teacher-forced sequences, reduced inside the forward (MLX).

Each observed row [B, T, hidden] becomes [B, T, V + 1] (h . u for V unit directions, and |h|)
in the graph, so only those numbers are copied to the host. Sequences go through the model
`chunk` tokens at a time into a KV cache (prefill), so attention holds [chunk, T] scores, not
[T, T]: a long transcript is traced in bounded memory."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pertoken.backends.mlx.batch import SteerPlan
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.plan import PaddedBatch


def token_projections(
    model,
    directions: np.ndarray,
    rows: list[int],
    batches: list[PaddedBatch],
    *,
    plan: SteerPlan | None = None,
    chunk: int = CHUNK,
) -> list[np.ndarray]:
    """Per sequence float32 [T, len(rows), V + 1], for the sequences of the planned
    `batches`; see Backend.token_projections."""
    units = mx.array(directions)  # [V, R, hidden]
    out: list[np.ndarray] = [np.zeros(0)] * sum(len(b.index) for b in batches)
    for batch in batches:
        kw = {}
        if plan is not None:
            kw = {"steer": plan.vectors, "steer_on": plan.prefill_on(batch)}
        res = _batch(model, units, rows, batch, chunk, kw)  # [B, T, R, V + 1]
        for i, one in zip(batch.index, batch.unpadded(res)):
            out[i] = one.copy()
    return out


def _batch(
    model, units: mx.array, rows: list[int], batch: PaddedBatch, chunk: int, kw
) -> np.ndarray:
    """[B, T, R, V + 1] of one padded batch, chunk by chunk."""
    got: dict[int, list[mx.array]] = {}  # row index -> per chunk [B, t, V + 1]
    observe = _reducer(units, rows, got)
    prefill(
        model, batch, chunk=chunk, head="none", observe=lambda start: observe,
        hold=lambda: [a for parts in got.values() for a in parts], **kw,
    )  # fmt: skip
    by_row = [mx.concatenate(got[k], axis=1) for k in range(len(rows))]
    return np.array(mx.stack(by_row, axis=2))


def _reducer(units: mx.array, rows: list[int], got: dict[int, list[mx.array]]):
    """An observer that turns each wanted row [B, t, hidden] of a chunk into [B, t, V + 1]."""

    def observe(row: int, h: mx.array) -> None:
        for k, r in enumerate(rows):
            if r == row:
                h32 = h.astype(mx.float32)  # [B, t, hidden]
                norm = mx.sqrt(mx.sum(h32 * h32, axis=-1, keepdims=True))  # [B, t, 1]
                got.setdefault(k, []).append(mx.concatenate([h32 @ units[:, k].T, norm], -1))

    return observe
