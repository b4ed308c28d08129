"""A planned batch (backends/plan.py) as MLX arrays, steering plans, and the Passes over them."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from pertoken.backends.base import Steer
from pertoken.backends.mlx.models.residual import Pass, RowOps, attend_mask
from pertoken.backends.plan import PaddedBatch
from pertoken.backends.steer import Stage


def ids_of(batch: PaddedBatch) -> mx.array:
    return mx.array(batch.ids)  # [B, T] int32


def valid_of(batch: PaddedBatch) -> mx.array:
    return mx.array(batch.mask)  # [B, T] bool


def offset_of(batch: PaddedBatch) -> mx.array:
    # Rope positions count from each slot's first real token.
    return mx.array(-batch.pad.astype(np.int32))  # [B]


@dataclass
class SteerPlan:
    """Validated steering as arrays, plus where it acts.

    vectors: per row, the sum of adds ([hidden] for one Steer on every slot of the batch,
    [B, 1, hidden] with each slot's own, zeros where a slot is not steered there) in the model
    dtype, or a RowOps where any plan ablates or caps; positions one choice or one per slot."""

    vectors: dict[int, mx.array | RowOps]
    positions: str | list[str]
    dtype: object = mx.float32

    @classmethod
    def of(cls, steer: Steer | None, dtype) -> SteerPlan | None:
        if steer is None or not steer.terms:
            return None
        if steer.adds_only:
            vectors = {r: mx.array(v).astype(dtype) for r, v in steer.by_row().items()}
            return cls(vectors, steer.positions, dtype)
        hidden = len(steer.terms[0].vector)
        return cls(_row_steering([steer], hidden, dtype, single=True), steer.positions, dtype)

    @classmethod
    def per_slot(cls, plans: list[Steer | None], hidden_size: int, dtype) -> SteerPlan | None:
        """One batch whose slots carry their own Steer (or None)."""
        vectors = _row_steering(plans, hidden_size, dtype)
        if not vectors:
            return None
        return cls(vectors, [p.positions if p else "all" for p in plans], dtype)

    def _slot_positions(self, B: int) -> list[str]:
        return [self.positions] * B if isinstance(self.positions, str) else self.positions

    def prefill_on(self, batch: PaddedBatch) -> mx.array:
        """[B, T, 1] in the vectors' dtype: the plan's steering mask over the batch."""
        return mx.array(batch.steer_mask(self.positions)[..., None]).astype(self._dtype)

    def step_kw(self, B: int) -> dict:
        """Pass fields for a decode step: every slot steers there except `prompt` slots."""
        positions = self._slot_positions(B)
        if all(p == "prompt" for p in positions):
            return {}
        if all(p != "prompt" for p in positions):
            return {"steer": self.vectors}
        on = np.array([p != "prompt" for p in positions], np.float32)[:, None, None]  # [B, 1, 1]
        return {"steer": self.vectors, "steer_on": mx.array(on).astype(self._dtype)}

    @property
    def _dtype(self):
        return self.dtype


def _row_steering(plans: list[Steer | None], hidden: int, dtype, single: bool = False) -> dict:
    """Row -> [B, 1, hidden] sums of adds where every plan only adds there (or [hidden] for a
    single plan), else RowOps with as many stages as the longest plan there."""
    staged = [p.stages() if p is not None else {} for p in plans]
    rows = sorted({r for st in staged for r in st})
    out = {}
    for row in rows:
        slots = [st.get(row, []) for st in staged]
        K = max(len(x) for x in slots)
        if all(s.unit is None for x in slots for s in x) and K == 1:
            add = np.zeros((len(plans), 1, hidden), np.float32)
            for b, x in enumerate(slots):
                if x:
                    add[b, 0] = x[0].add
            out[row] = mx.array(add[0, 0] if single else add).astype(dtype)
        else:
            out[row] = _ops(slots, K, hidden, dtype)
    return out


def _ops(slots: list[list[Stage]], K: int, hidden: int, dtype) -> RowOps:
    B = len(slots)
    add, unit = np.zeros((2, K, B, 1, hidden), np.float32)
    lo, hi = np.full((K, B, 1, 1), -np.inf, np.float32), np.full((K, B, 1, 1), np.inf, np.float32)
    for b, stages in enumerate(slots):
        for k, s in enumerate(stages):
            if s.add is not None:
                add[k, b, 0] = s.add
            if s.unit is not None:
                unit[k, b, 0], lo[k, b], hi[k, b] = s.unit, s.lo, s.hi
    return RowOps(mx.array(add).astype(dtype), mx.array(unit), mx.array(lo), mx.array(hi))


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
