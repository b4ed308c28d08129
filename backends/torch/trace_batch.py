"""Per-token projections of teacher-forced sequences, reduced inside the forward (torch).

Each captured row [B, T, hidden] becomes [B, T, V + 1] (h . u for V unit directions, and |h|)
on the device, so no [T, hidden] copy ever reaches the host."""

from __future__ import annotations

import numpy as np
import torch

from pertoken.backends.base import Steer, check_projection_inputs
from pertoken.backends.plan import plan_batches
from pertoken.backends.torch.batch import batch_tensors, steer_tensor
from pertoken.backends.torch.hooks import residual_taps


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
        tokens, attn, pos = batch_tensors(batch, backend.device)  # [B, T] each
        if steer is not None:
            state.steer_mask = steer_tensor(batch, steer.positions, backend.device)
        reducer = _Reducer(units, list(rows))
        state.on_row = reducer.on_row
        with residual_taps(backend.model, state):
            base(input_ids=tokens, attention_mask=attn, position_ids=pos, use_cache=False)
        for i, got in zip(batch.index, batch.unpadded(reducer.result())):  # [T, R, V + 1]
            out[i] = got.copy()
    return out


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

    def result(self) -> np.ndarray:
        stacked = torch.stack([self.got[k] for k in range(len(self.rows))], dim=2)
        return stacked.cpu().numpy()  # [B, T, R, V + 1]
