"""Per-token projections of teacher-forced sequences, reduced inside the forward (torch).

Each captured row [B, T, hidden] becomes [B, T, V + 1] (h . u for V unit directions, and |h|)
on the device, so no [T, hidden] copy ever reaches the host."""

from __future__ import annotations

import numpy as np
import torch

from pertoken.backends.base import Steer, check_projection_inputs, steer_mask
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
    plens = list(prompt_lens) if prompt_lens is not None else [len(s) for s in ids]
    state = backend._tap_state(steer)
    state.rows = frozenset(rows)
    base = backend.model.get_decoder()
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[np.ndarray] = [np.zeros(0)] * len(ids)
    for start in range(0, len(order), max(1, batch_size)):
        idx = order[start : start + max(1, batch_size)]
        seqs = [ids[i] for i in idx]
        tokens, attn = backend._right_pad(seqs)  # [B, T] each
        if steer is not None:
            state.steer_mask = _steer_mask(seqs, [plens[i] for i in idx], steer, attn.device)
        reducer = _Reducer(units, list(rows))
        state.on_row = reducer.on_row
        with residual_taps(backend.model, state):
            base(input_ids=tokens, attention_mask=attn, use_cache=False)
        got = reducer.result()  # [B, T, R, V + 1]
        for j, i in enumerate(idx):
            out[i] = got[j, : len(seqs[j])].copy()
    return out


def _steer_mask(seqs, prompt_lens, steer: Steer, device) -> torch.Tensor:
    """[B, T] bool for right-padded rows: where the Steer acts, never on padding."""
    T = max(len(s) for s in seqs)
    mask = np.zeros((len(seqs), T), dtype=bool)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        mask[b, : len(s)] = steer_mask(int(p), len(s), steer.positions)
    return torch.from_numpy(mask).to(device)


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
