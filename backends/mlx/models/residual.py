"""The residual stream as pertoken sees it: one forward pass that steers and captures rows.

Row 0 is the embedding output, row L (1 <= L < n_layers) the output of block L-1, row n_layers
the final norm of the last block's output. Steering at row L adds to block L-1's output, so
steering at row n_layers happens before the final norm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

# Called with (row, h [B, L, hidden]) for every row of a forward pass.
Observer = Callable[[int, mx.array], None]


@dataclass
class RowOps:
    """One row's steering stages (backends/steer.py): per stage k, h + add[k], then the
    projection p = h . unit[k] clamped to [lo[k], hi[k]]. A slot whose stage only adds
    has a zero unit and infinite bounds; B may be 1 (every slot alike)."""

    add: mx.array  # [K, B, 1, hidden] model dtype
    unit: mx.array  # [K, B, 1, hidden] float32
    lo: mx.array  # [K, B, 1, 1] float32
    hi: mx.array  # [K, B, 1, 1] float32

    def apply(self, h: mx.array, on: mx.array | None) -> mx.array:
        # h [B, L, hidden]; on [B, L, 1] or None. Adds in the model dtype (as a plain add);
        # the clamp in float32, so a token already inside its bounds keeps its bits.
        for k in range(self.add.shape[0]):
            h = h + self.add[k] if on is None else h + on * self.add[k]
            x, u = h.astype(mx.float32), self.unit[k]
            p = (x * u).sum(-1, keepdims=True)  # [B, L, 1]
            shift = mx.clip(p, self.lo[k], self.hi[k]) - p
            shift = shift if on is None else shift * on.astype(mx.float32)
            h = (x + shift * u).astype(h.dtype)
        return h


@dataclass
class Pass:
    """Everything one forward pass needs beyond the token ids."""

    offset: mx.array | int = 0  # [B] rope position of each slot's first input token
    mask: mx.array | str | None = None  # [B, 1, L, S] bool: keys each query may see, or "causal"
    window_mask: mx.array | None = None  # the same for sliding-window layers
    # row -> [hidden] or [B, 1, hidden] model dtype (a sum of adds), or RowOps
    steer: dict[int, mx.array | RowOps] = field(default_factory=dict)
    steer_on: mx.array | None = None  # [B, L, 1] model dtype: 1 where steering acts
    observe: Observer | None = None
    # "all" logits, "last" the last position only, "none" no logits, or [B] int: per row the
    # position whose logits are kept (rows of different lengths in one right-padded batch)
    head: str | mx.array = "all"

    def kept(self, h: mx.array) -> mx.array:
        """The positions of h [B, L, hidden] whose logits the pass returns."""
        if isinstance(self.head, mx.array):
            return mx.take_along_axis(h, self.head[:, None, None], axis=1)  # [B, 1, hidden]
        return h[:, -1:] if self.head == "last" else h

    def mask_for(self, sliding: bool) -> mx.array | str | None:
        return self.window_mask if sliding else self.mask

    def steered(self, row: int, h: mx.array) -> mx.array:
        vec = self.steer.get(row)
        if vec is None:
            return h
        if isinstance(vec, RowOps):
            return vec.apply(h, self.steer_on)
        return h + vec if self.steer_on is None else h + self.steer_on * vec

    def see(self, row: int, h: mx.array) -> None:
        if self.observe is not None:
            self.observe(row, h)


def run_blocks(layers, norm, h: mx.array, cache, p: Pass) -> mx.array:
    """Blocks, steering and capture from the embedding output `h` to the final norm."""
    n = len(layers)
    cache = cache if cache is not None else [None] * n
    p.see(0, h)
    for i, (layer, c) in enumerate(zip(layers, cache, strict=True)):
        h = p.steered(i + 1, layer(h, p.mask_for(layer.use_sliding), c, p.offset))
        if i + 1 < n:
            p.see(i + 1, h)
    h = norm(h)  # [B, L, hidden]
    p.see(n, h)
    return h


def attend_mask(valid: mx.array, n_queries: int, window: int | None = None) -> mx.array:
    """[B, 1, L, S] bool from `valid` [B, S] (real keys) for the last L of S positions.

    Causal, optionally windowed (query - key < window), padding keys hidden. Every query
    sees itself, so padding queries stay finite instead of softmaxing over nothing."""
    S = valid.shape[1]
    q = mx.arange(S - n_queries, S)[:, None]  # [L, 1]
    k = mx.arange(S)[None]  # [1, S]
    allowed = k <= q
    if window is not None:
        allowed = allowed & (q - k < window)
    mask = allowed[None] & valid[:, None, :]  # [B, L, S]
    mask = mask | (k == q)[None]
    return mask[:, None]
