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
class RowOps:
    """One row's steering stages for a batch (backends/steer.py): per stage k, h + add[k],
    then the projection p = h . unit[k] clamped to [lo[k], hi[k]]. A slot whose stage
    only adds has a zero unit and infinite bounds; B may be 1 (every slot alike)."""

    add: torch.Tensor  # [K, B, hidden] float32
    unit: torch.Tensor  # [K, B, hidden] float32
    lo: torch.Tensor  # [K, B, 1] float32
    hi: torch.Tensor  # [K, B, 1] float32

    @classmethod
    def empty(cls, K: int, B: int, hidden: int, device) -> RowOps:
        z = torch.zeros(K, B, hidden, device=device)
        inf = torch.full((K, B, 1), float("inf"), device=device)
        return cls(z, z.clone(), -inf, inf.clone())

    def apply(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # h [B, t, hidden]; mask [B, t] or None. Adds in the model dtype (as `_add`); the
        # clamp in float32, so a token already inside its bounds keeps its bits.
        on = None if mask is None else mask.to(h.device).unsqueeze(-1)  # [B, t, 1]
        for k in range(self.add.shape[0]):
            h = _add(h, self.add[k], mask)
            x, u = h.float(), self.unit[k][:, None]  # [B, t, hidden], [B, 1, hidden]
            p = (x * u).sum(-1, keepdim=True)  # [B, t, 1]
            shift = p.clamp(self.lo[k][:, None], self.hi[k][:, None]) - p
            shift = shift if on is None else shift * on
            h = (x + shift * u).to(h.dtype)
        return h

    def load(self, src, B: int) -> None:
        """Copy steering for B slots in: None, a [hidden] or [B, hidden] sum of adds, or a
        RowOps with at most as many stages; stages past the source's do nothing."""
        self.add.zero_()
        self.unit.zero_()
        self.lo.fill_(-float("inf"))
        self.hi.fill_(float("inf"))
        if src is None:
            return
        if not isinstance(src, RowOps):
            self.add[0, :B].copy_(src.to(self.add.device, torch.float32).expand(B, -1))
            return
        K = src.add.shape[0]
        for mine, theirs in zip((self.add, self.unit, self.lo, self.hi), _fields(src)):
            mine[:K, :B].copy_(theirs.to(mine.device).expand(K, B, -1))


def _fields(ops: RowOps) -> tuple[torch.Tensor, ...]:
    return ops.add, ops.unit, ops.lo, ops.hi


@dataclass
class TapState:
    """What the hooks need for the forward about to run; the decode loop updates it."""

    # row -> [hidden] or [B, hidden] (a sum of adds), or RowOps (any operators)
    steer: dict[int, torch.Tensor | RowOps] = field(default_factory=dict)
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


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where a module runs: accelerate's device for a sharded or offloaded model (whose
    parameters may sit on the meta device), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return next(module.parameters()).device


def block_devices(model) -> list[torch.device]:
    """The device each decoder block runs on (one device unless the model is sharded)."""
    layers, _ = decoder_parts(model)
    return [execution_device(layer) for layer in layers]


def input_device(model) -> torch.device:
    """Where token ids go in: the embedding's device."""
    return execution_device(model.get_input_embeddings())


def _add(h: torch.Tensor, vec: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # h [B, t, hidden]; vec [hidden], or [B, hidden] with one vector per slot; mask [B, t]
    vec = vec.to(h.device, h.dtype)  # a no-op when placed on the block's device beforehand
    if vec.ndim == 2:
        vec = vec[:, None, :]  # [B, 1, hidden]
    if mask is None:
        return h + vec
    return h + mask.to(h.device).unsqueeze(-1).to(h.dtype) * vec


def _steered(h: torch.Tensor, ops, mask: torch.Tensor | None) -> torch.Tensor:
    return ops.apply(h, mask) if isinstance(ops, RowOps) else _add(h, ops, mask)


@contextmanager
def residual_taps(model, state: TapState):
    """Install steering and capture hooks for the duration of the block; always removed.

    Captured states reach `state.on_row` on the device the model's inputs go to, whichever
    device the block ran on."""
    layers, norm = decoder_parts(model)
    n = len(layers)
    home = input_device(model)
    handles = []

    def emit(row: int, h: torch.Tensor) -> None:
        if state.on_row is not None and row in state.rows:
            state.on_row(row, h.to(home))

    def block_hook(i: int):
        def hook(_module, _args, output):
            h = output[0] if isinstance(output, tuple) else output
            row = i + 1  # block i writes row i + 1
            if row in state.steer:
                h = _steered(h, state.steer[row], state.steer_mask)
            if row < n:
                emit(row, h)
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
