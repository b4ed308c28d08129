"""Per-token projections of teacher-forced sequences, reduced inside the forward (torch).

Each captured row [B, T, hidden] becomes [B, T, V + 1] (h . u for V unit directions, and |h|)
on the device, so no [T, hidden] copy ever reaches the host. A batch longer than CHUNK tokens
goes through the model a chunk at a time into a KV cache, so attention holds [chunk, T] scores
(and masks), not [T, T]: a long transcript is traced in bounded memory."""

from __future__ import annotations

import numpy as np
import torch

from pertoken.backends.base import Steer, check_projection_inputs
from pertoken.backends.plan import plan_batches
from pertoken.backends.torch.batch import batch_tensors, cache_kwarg, make_cache, steer_tensor
from pertoken.backends.torch.hooks import residual_taps

CHUNK = 512  # input tokens per forward (as MLX's prefill)


@torch.inference_mode()
def token_projections(
    backend,
    ids: list[list[int]],
    directions: np.ndarray,
    rows: list[int],
    *,
    steer: Steer | None = None,
    prompt_lens: list[int] | None = None,
    batch_size: int = 16,
) -> list[np.ndarray]:
    """Per sequence float32 [T, len(rows), V + 1]; see Backend.token_projections."""
    d = check_projection_inputs(ids, directions, rows, backend.n_layers, backend.hidden_size)
    units = torch.from_numpy(d).to(backend.device, torch.float32)  # [V, R, hidden]
    state = backend._tap_state(steer)
    state.rows = frozenset(rows)
    base = backend.model.get_decoder()
    out: list[np.ndarray] = [np.zeros(0)] * len(ids)
    pad = backend.pad_id
    for batch in plan_batches(ids, pad, prompt_lens=prompt_lens, batch_size=batch_size):
        on = None if steer is None else steer_tensor(batch, steer.positions, backend.device)
        with residual_taps(backend.model, state):
            res = _batch(backend, base, state, units, list(rows), batch, on)  # [B, T, R, V + 1]
        for i, got in zip(batch.index, batch.unpadded(res)):
            out[i] = got.copy()
    return out


def _batch(backend, base, state, units, rows, batch, on) -> np.ndarray:
    """[B, T, R, V + 1] of one padded batch, CHUNK tokens per forward; `on` [B, T] is where
    steering acts."""
    tokens, attn, pos = batch_tensors(batch, backend.device)  # [B, T] each
    T = tokens.shape[1]
    # one forward when it fits in a chunk; else a KV cache carries the chunks before
    cached = {cache_kwarg(base): make_cache(backend.model)} if T > CHUNK else {}
    parts = []
    for s in range(0, T, CHUNK):
        e = min(s + CHUNK, T)
        state.steer_mask = None if on is None else on[:, s:e]
        reducer = _Reducer(units, rows)
        state.on_row = reducer.on_row
        base(input_ids=tokens[:, s:e], attention_mask=attn[:, :e], position_ids=pos[:, s:e],
             use_cache=bool(cached), **cached)  # fmt: skip
        parts.append(reducer.stacked())  # [B, e - s, R, V + 1]
    return torch.cat(parts, dim=1).cpu().numpy()


class _Reducer:
    """Projections and norms of each captured row, [B, T, V + 1] per row, kept on the device."""

    def __init__(self, units: torch.Tensor, rows: list[int]):
        self.units, self.rows = units, rows  # [V, R, hidden]
        self.got: dict[int, torch.Tensor] = {}

    def on_row(self, row: int, h: torch.Tensor) -> None:
        h = h.float()  # [B, T, hidden]
        for k, r in enumerate(self.rows):
            if r == row:
                proj = h @ self.units[:, k].T  # [B, T, V]
                self.got[k] = torch.cat([proj, h.norm(dim=-1, keepdim=True)], dim=-1)

    def stacked(self) -> torch.Tensor:
        return torch.stack([self.got[k] for k in range(len(self.rows))], dim=2)  # [B, T, R, V+1]
