"""A planned batch (backends/plan.py) as MLX arrays, steering plans, and the Passes over them."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pertoken.backends.base import Steer
from pertoken.backends.mlx.models.residual import Pass, attend_mask
from pertoken.backends.plan import PaddedBatch


def ids_of(batch: PaddedBatch) -> mx.array:
    return mx.array(batch.ids)  # [B, T] int32


def valid_of(batch: PaddedBatch) -> mx.array:
    return mx.array(batch.mask)  # [B, T] bool


def offset_of(batch: PaddedBatch) -> mx.array:
    # Rope positions count from each row's first real token.
    return mx.array(-batch.pad.astype(np.int32))  # [B]


@dataclass
class SteerPlan:
    """Validated steering as model-dtype arrays, plus where it acts.

    vectors: row -> [hidden] for one Steer on every row of the batch, or row -> [B, 1, hidden]
    with each row's own sum (zeros where a row is not steered there); positions likewise one
    choice or one per row."""

    vectors: dict[int, mx.array]
    positions: str | list[str]

    @classmethod
    def of(cls, steer: Steer | None, dtype) -> SteerPlan | None:
        if steer is None or not steer.terms:
            return None
        vectors = {r: mx.array(v).astype(dtype) for r, v in steer.by_row().items()}
        return cls(vectors, steer.positions)

    @classmethod
    def per_row(cls, plans: list[Steer | None], hidden_size: int, dtype) -> SteerPlan | None:
        """One batch whose rows carry their own Steer (or None)."""
        sums: dict[int, np.ndarray] = {}
        for b, plan in enumerate(plans):
            for row, vec in (plan.by_row() if plan else {}).items():
                sums.setdefault(row, np.zeros((len(plans), 1, hidden_size), np.float32))[b, 0] = vec
        if not sums:
            return None
        vectors = {r: mx.array(v).astype(dtype) for r, v in sums.items()}
        return cls(vectors, [p.positions if p else "all" for p in plans])

    def _row_positions(self, B: int) -> list[str]:
        return [self.positions] * B if isinstance(self.positions, str) else self.positions

    def prefill_on(self, batch: PaddedBatch) -> mx.array:
        """[B, T, 1] in the vectors' dtype: the plan's steering mask over the batch."""
        return mx.array(batch.steer_mask(self.positions)[..., None]).astype(self._dtype)

    def step_kw(self, B: int) -> dict:
        """Pass fields for a decode step: every row steers there except `prompt` rows."""
        rows = self._row_positions(B)
        if all(p == "prompt" for p in rows):
            return {}
        if all(p != "prompt" for p in rows):
            return {"steer": self.vectors}
        on = np.array([p != "prompt" for p in rows], np.float32)[:, None, None]  # [B, 1, 1]
        return {"steer": self.vectors, "steer_on": mx.array(on).astype(self._dtype)}

    @property
    def _dtype(self):
        return next(iter(self.vectors.values())).dtype


def window_of(model) -> int | None:
    """The sliding window, when any layer uses one."""
    return model.sliding_window if any(lay.use_sliding for lay in model.layers) else None


def full_pass(batch: PaddedBatch, window: int | None, **kw) -> Pass:
    """A Pass over a whole padded batch (prefill or a cache-free forward)."""
    valid, T = valid_of(batch), batch.ids.shape[1]
    return Pass(
        offset=offset_of(batch),
        mask=attend_mask(valid, T),
        window_mask=attend_mask(valid, T, window) if window else None,
        **kw,
    )


def step_pass(valid: mx.array, offset: mx.array, window: int | None, **kw) -> Pass:
    """A Pass for one decode step; `valid` [B, S] already includes the new token."""
    return Pass(
        offset=offset,
        mask=attend_mask(valid, 1),
        window_mask=attend_mask(valid, 1, window) if window else None,
        **kw,
    )
