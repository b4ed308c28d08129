"""Residual-stream taps for transformers decoder models: steer and capture by row.

Row 0 is read at the input of block 0 (the embedding, already scaled for Gemma), row L
(1 <= L < n_layers) at the output of block L-1, row n_layers at the output of the final norm;
steering at row L adds to the output of block L-1 before anything reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# Called with (row, hidden [B, t, hidden]) for each captured row at every forward.
RowCallback = Callable[[int, torch.Tensor], None]


@dataclass
class TapState:
    """What the hooks need for the forward about to run; the decode loop updates it."""

    steer: dict[int, torch.Tensor] = field(default_factory=dict)  # block -> [hidden] or [B, hidden]
    steer_mask: torch.Tensor | None = None  # [B, t] bool, None = every position
    rows: frozenset[int] = frozenset()
    on_row: RowCallback | None = None


def decoder_parts(model) -> tuple[list, torch.nn.Module]:
    """The decoder block list and the final norm of a causal LM (Llama, Gemma, Qwen, Mistral...)."""
    base = getattr(model, "model", None) or getattr(model, "transformer", None)
    layers = getattr(base, "layers", None) or getattr(base, "h", None)
    norm = getattr(base, "norm", None) or getattr(base, "ln_f", None)
    if layers is None or norm is None:
        raise TypeError(f"cannot find decoder layers and final norm in {type(model).__name__}")
    return list(layers), norm


def _add(h: torch.Tensor, vec: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # h [B, t, hidden]; vec [hidden], or [B, hidden] with one vector per row; mask [B, t]
    if vec.ndim == 2:
        vec = vec[:, None, :]  # [B, 1, hidden]
    if mask is None:
        return h + vec.to(h.dtype)
    return h + mask.unsqueeze(-1).to(h.dtype) * vec.to(h.dtype)


@contextmanager
def residual_taps(model, state: TapState):
    """Install steering and capture hooks for the duration of the block; always removed."""
    layers, norm = decoder_parts(model)
    n = len(layers)
    handles = []

    def emit(row: int, h: torch.Tensor) -> None:
        if state.on_row is not None and row in state.rows:
            state.on_row(row, h)

    def block_hook(i: int):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            if i in state.steer:
                h = _add(h, state.steer[i], state.steer_mask)
            if i + 1 < n:
                emit(i + 1, h)
            if isinstance(output, tuple):
                return (h, *output[1:])
            return h

        return hook

    def embed_hook(_module, args, kwargs):
        emit(0, args[0] if args else kwargs["hidden_states"])

    def norm_hook(_module, _args, output):
        emit(n, output)

    try:
        handles.append(layers[0].register_forward_pre_hook(embed_hook, with_kwargs=True))
        for i, layer in enumerate(layers):
            handles.append(layer.register_forward_hook(block_hook(i)))
        handles.append(norm.register_forward_hook(norm_hook))
        yield state
    finally:
        for h in handles:
            h.remove()
