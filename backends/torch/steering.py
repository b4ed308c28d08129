"""Steering plans (backends/steer.py) as the hooks' state: per residual row, one entry per slot.

A row where every plan only adds keeps the sum of its adds, a [B, hidden] vector (the fast
path, and bit for bit what adding always did); a row where any plan ablates or caps gets a
RowOps with as many stages as the longest plan there."""

from __future__ import annotations

import torch

from pertoken.backends.steer import Stage, Steer
from pertoken.backends.torch.hooks import RowOps, block_devices
from pertoken.errors import PertokenError
from pertoken.rows import block_of_row

Buffers = dict[int, torch.Tensor | RowOps]


def steer_buffers(model, plans: list[Steer | None], B: int) -> Buffers:
    """Zeroed per-row steering for B slots, shaped for every plan in `plans`, each row's
    buffer on its block's device."""
    stages: dict[int, int] = {}  # row -> stages, 0 where every plan only adds
    for plan in plans:
        for row, K in _stage_counts(plan).items():
            stages[row] = max(stages.get(row, 0), K)
    devices, hidden = block_devices(model), model.config.hidden_size
    out: Buffers = {}
    for row, K in sorted(stages.items()):
        d = devices[block_of_row(row, len(devices))]
        out[row] = RowOps.empty(K, B, hidden, d) if K else torch.zeros(B, hidden, device=d)
    return out


def set_slot(buffers: Buffers, b: int, plan: Steer | None) -> None:
    """Slot b of each row's buffer takes the plan's steering there (nothing if none)."""
    stages = plan.stages() if plan is not None else {}
    extra = set(stages) - set(buffers)
    if extra:
        raise PertokenError(f"steering at layers {sorted(extra)} has no buffer in this batch")
    for row, buf in buffers.items():
        got = stages.get(row, [])
        if isinstance(buf, RowOps):
            _set_stages(buf, b, got)
        elif any(s.unit is not None for s in got) or len(got) > 1:
            raise PertokenError(f"layer {row} of this batch was prepared for adding only")
        else:
            buf[b] = torch.from_numpy(got[0].add) if got else 0.0


def steer_state(model, plans: list[Steer | None]) -> Buffers:
    """Steering for one batch whose slots carry their own plans (or None)."""
    buffers = steer_buffers(model, plans, len(plans))
    for b, plan in enumerate(plans):
        set_slot(buffers, b, plan)
    return buffers


def _set_stages(buf: RowOps, b: int, stages: list[Stage]) -> None:
    if len(stages) > buf.add.shape[0]:
        raise PertokenError(f"{len(stages)} steering stages at a layer prepared for fewer")
    buf.add[:, b], buf.unit[:, b] = 0.0, 0.0
    buf.lo[:, b], buf.hi[:, b] = -float("inf"), float("inf")
    for k, s in enumerate(stages):
        if s.add is not None:
            buf.add[k, b] = torch.from_numpy(s.add)
        if s.unit is not None:
            buf.unit[k, b] = torch.from_numpy(s.unit)
            buf.lo[k, b], buf.hi[k, b] = s.lo, s.hi


def ops_shape(buffers: Buffers) -> tuple[tuple[int, int], ...]:
    """(row, stages) of each row that needs RowOps: what a compiled step must be built for."""
    return tuple((r, v.add.shape[0]) for r, v in sorted(buffers.items()) if isinstance(v, RowOps))


def _stage_counts(plan: Steer | None) -> dict[int, int]:
    """Per row the plan steers: its stages where it ablates or caps there, else 0."""
    out = {}
    for row, st in (plan.stages() if plan is not None else {}).items():
        out[row] = len(st) if any(s.unit is not None for s in st) else 0
    return out


def ops_with(ops: tuple[tuple[int, int], ...], plans) -> tuple[tuple[int, int], ...]:
    """`ops` (as ops_shape) widened to hold every plan's operators too."""
    out = dict(ops)
    for plan in plans:
        for row, K in _stage_counts(plan).items():
            if K:
                out[row] = max(out.get(row, 0), K)
    return tuple(sorted(out.items()))


def ops_cover(have: tuple[tuple[int, int], ...], want: tuple[tuple[int, int], ...]) -> bool:
    """Whether buffers shaped `have` can take steering shaped `want`."""
    held = dict(have)
    return all(held.get(row, 0) >= K for row, K in want)


def copy_slots(dst: torch.Tensor | RowOps, src: torch.Tensor | RowOps, n: int) -> None:
    """The first n slots of one row's steering into a buffer with as many stages or more."""
    if not isinstance(dst, RowOps):
        dst[:n] = src[:n]
    elif not isinstance(src, RowOps):
        dst.add[0, :n] = src[:n].to(dst.add)
    else:
        K = src.add.shape[0]
        for mine, theirs in zip(_parts(dst), _parts(src)):
            mine[:K, :n] = theirs[:, :n].to(mine)


def move_slot(buf: torch.Tensor | RowOps, src: int, dst: int) -> None:
    """Slot src's steering into slot dst of the same buffer."""
    if isinstance(buf, RowOps):
        for part in _parts(buf):
            part[:, dst] = part[:, src]
    else:
        buf[dst] = buf[src]


def first_slots(buf: torch.Tensor | RowOps, w: int) -> torch.Tensor | RowOps:
    """Views of slots 0..w-1 of one row's steering."""
    if isinstance(buf, RowOps):
        return RowOps(*(part[:, :w] for part in _parts(buf)))
    return buf[:w]


def _parts(ops: RowOps) -> tuple[torch.Tensor, ...]:
    return ops.add, ops.unit, ops.lo, ops.hi
