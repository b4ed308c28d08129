"""Per-token projections of teacher-forced sequences, reduced inside the forward (MLX).

Each observed row [B, T, hidden] becomes [B, T, V + 1] (h . u for V unit directions, and |h|)
in the graph, so only those numbers are copied to the host."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from pertoken.backends.mlx.batch import SteerPlan, full_pass, ids_of, window_of
from pertoken.backends.plan import PaddedBatch


def token_projections(
    model,
    directions: np.ndarray,
    rows: list[int],
    batches: list[PaddedBatch],
    *,
    plan: SteerPlan | None = None,
) -> list[np.ndarray]:
    """Per sequence float32 [T, len(rows), V + 1], for the sequences of the planned
    `batches`; see Backend.token_projections."""
    units = mx.array(directions)  # [V, R, hidden]
    window = window_of(model)
    out: list[np.ndarray] = [np.zeros(0)] * sum(len(b.index) for b in batches)
    for batch in batches:
        kw = {}
        if plan is not None:
            kw = {"steer": plan.vectors, "steer_on": plan.prefill_on(batch)}
        got: dict[int, mx.array] = {}  # row index -> [B, T, V + 1]
        observe = _reducer(units, rows, got)
        model(ids_of(batch), None, full_pass(batch, window, head="none", observe=observe, **kw))
        res = np.array(mx.stack([got[k] for k in range(len(rows))], axis=2))  # [B, T, R, V+1]
        for i, one in zip(batch.index, batch.unpadded(res)):
            out[i] = one.copy()
    return out


def _reducer(units: mx.array, rows: list[int], got: dict[int, mx.array]):
    """An observer that turns each wanted row [B, T, hidden] into [B, T, V + 1] in `got`."""

    def observe(row: int, h: mx.array) -> None:
        for k, r in enumerate(rows):
            if r == row:
                h32 = h.astype(mx.float32)  # [B, T, hidden]
                norm = mx.sqrt(mx.sum(h32 * h32, axis=-1, keepdims=True))  # [B, T, 1]
                got[k] = mx.concatenate([h32 @ units[:, k].T, norm], axis=-1)

    return observe
