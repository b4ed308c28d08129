"""The compiled decode step: one token per slot through a static KV cache, with its inputs,
steering and captured states in preallocated device buffers, captured once as a CUDA graph and
replayed for every token.

The step reads everything that changes from one token or one call to the next (the token, its
position and cache index, the positions each slot holds, every block's steering vector per slot
and whether this token is steered) from buffers that are copied into, never replaced, so a new
prompt, vector, coefficient or layer needs no new capture. Only the batch size, the cache
length, the captured rows and the rows that ablate or cap (their stages) decide a capture.
Without CUDA (or on a sharded model) the same step runs as plain calls.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from pertoken.backends.torch.hooks import RowOps, TapState, block_devices, input_device
from pertoken.backends.torch.static_cache import SlotCache, attention_masks, check_attention
from pertoken.backends.torch.steering import first_slots, ops_cover
from pertoken.errors import PertokenWarning

LENGTH_STEP = 256  # cache lengths round up to this, so calls of similar length share a capture


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int  # cache positions per slot
    rows: tuple[int, ...]  # rows whose states each step captures
    ops: tuple[tuple[int, int], ...] = ()  # (row, stages) of rows that ablate or cap


class StaticStep:
    """The buffers of one shape and the forward passes over them."""

    def __init__(self, model, shape: Shape, dtype: torch.dtype):
        self.model, self.shape, self.dtype = model, shape, dtype
        B, L = shape.batch, shape.length
        home = input_device(model)
        hidden = model.config.hidden_size
        self.tokens = torch.zeros(B, 1, dtype=torch.long, device=home)  # fed this step
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=home)  # its rope position
        self.slot = torch.zeros(B, 1, dtype=torch.long, device=home)  # its cache slot
        self.key_pos = torch.full((B, L), -1, dtype=torch.long, device=home)  # per slot
        self.steer_on = torch.zeros(B, 1, dtype=torch.bool, device=home)
        # one vector per steerable row and slot, on its block's device: zero where
        # nothing steers (block i writes row i + 1); RowOps where a row ablates or caps
        ops = dict(shape.ops)
        self.steer = {
            i + 1: RowOps.empty(ops[i + 1], B, hidden, d)
            if i + 1 in ops
            else torch.zeros(B, hidden, dtype=dtype, device=d)
            for i, d in enumerate(block_devices(model))
        }
        self.captured = torch.zeros(B, len(shape.rows), hidden, device=home)  # float32
        self.cache = SlotCache(len(self.steer), L)
        self.logits: torch.Tensor | None = None  # [B, vocab] float32, the step's output
        self.trim = True  # attend to the written slots only (False: the whole cache, for graphs)

    def first(self, w: int) -> StaticStep:
        """A step over slots 0..w-1 whose buffers are views of this one's (a plain step costs
        as many slots as it runs, busy or not)."""
        if w == self.shape.batch:
            return self
        view = copy.copy(self)
        view.shape = replace(self.shape, batch=w)
        for name in ("tokens", "pos", "slot", "key_pos", "steer_on", "captured"):
            setattr(view, name, getattr(self, name)[:w])
        view.steer = {row: first_slots(buf, w) for row, buf in self.steer.items()}
        view.cache = self.cache.first(w)
        return view

    def grab(self, row: int, h: torch.Tensor) -> None:
        """Keeps the last position's state of a captured row (called by the hooks)."""
        self.captured[:, self.shape.rows.index(row)].copy_(h[:, -1].float())

    def forward(self, ids, pos, slots) -> torch.Tensor:
        """ids, pos, slots [B, T] -> last position's logits [B, vocab] float32."""
        self.cache.slots = slots
        # a plain step's attention costs what is written, not the cache's length
        n = int(slots.max()) + 1 if self.trim else self.shape.length
        self.cache.used = n
        masks = attention_masks(self.model.config, self.key_pos[:, :n], pos, slots, self.dtype)
        out = self.model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1].float().to(self.tokens.device)

    def prefill(self, ids, attn, pos) -> torch.Tensor:
        """Writes the prompts (ids, attention mask, positions [B, T0]) at slots 0..T0-1; the
        next step writes slot T0."""
        B, T0 = ids.shape
        slots = torch.arange(T0, device=pos.device).expand(B, T0)
        self.key_pos.fill_(-1)
        self.key_pos[:, :T0] = torch.where(attn.bool(), pos, -1)
        logits = self.forward(ids, pos, slots)
        self.pos.copy_(pos[:, -1:] + 1)
        self.slot.fill_(T0)
        return logits

    def step(self) -> torch.Tensor:
        """One token per slot from the buffers; advances position and cache index on the device."""
        self.key_pos.scatter_(1, self.slot, self.pos)
        logits = self.forward(self.tokens, self.pos, self.slot)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits


def bind(state: TapState, step: StaticStep) -> None:
    """Points the hooks' state at the step's buffers: the decode steps read them from there."""
    state.steer, state.steer_mask = step.steer, step.steer_on
    state.rows = frozenset(step.shape.rows)
    state.on_row = step.grab if step.shape.rows else None


def eager_steps(model) -> Callable:
    """A step source for the slot loop: a fresh StaticStep per loop, run as plain calls."""
    dtype = next(model.parameters()).dtype

    def source(shape: Shape, state: TapState):
        step = StaticStep(model, shape, dtype)
        bind(state, step)
        return step, step.step

    return source


class CompiledSteps:
    """The step source of `--compile`: one StaticStep kept while the model stays loaded and
    captured as a CUDA graph on CUDA, replayed for every decode step of every loop that fits.

    `warmup_seconds` adds up the time spent capturing (once per batch size, cache length and
    captured rows); `captures` counts them."""

    def __init__(self, model):
        check_attention(model.config)
        self.model = model
        self.dtype = next(model.parameters()).dtype
        devices = set(block_devices(model)) | {input_device(model)}
        self.graphs = len(devices) == 1 and next(iter(devices)).type == "cuda"
        if len(devices) > 1:
            warnings.warn(
                "the model is split across devices, so the compiled decode step runs without "
                "a CUDA graph (static cache only)",
                PertokenWarning,
                stacklevel=2,
            )
        self.warmup_seconds = 0.0
        self.captures = 0
        self._step: StaticStep | None = None
        self._graph = None

    def __call__(self, shape: Shape, state: TapState):
        step = self._ready(shape)
        bind(state, step)
        if self.graphs and self._graph is None:
            self._capture()
        return step, self.run

    def run(self) -> torch.Tensor:
        """One decode step: replay the graph, or call the step."""
        if self._graph is None:
            return self._step.step()
        self._graph.replay()
        return self._step.logits

    def _ready(self, shape: Shape) -> StaticStep:
        """The current step when it fits (more slots than asked cost about the same per step),
        else a new one, its length rounded up so loops of similar length share a capture."""
        s = self._step
        if s and s.shape.rows == shape.rows and shape.batch <= s.shape.batch:
            if shape.length <= s.shape.length and ops_cover(s.shape.ops, shape.ops):
                return s
        self._step = self._graph = None  # free the old buffers before allocating new ones
        if self.graphs:
            torch.cuda.empty_cache()
        L = -(-shape.length // LENGTH_STEP) * LENGTH_STEP
        self._step = StaticStep(self.model, replace(shape, length=L), self.dtype)
        return self._step

    def _capture(self) -> None:
        """Capture the step as a CUDA graph after two warm-up runs on a side stream. The
        warm-up writes garbage that loading a slot resets (positions, slots, key positions)."""
        s, t0 = self._step, time.perf_counter()
        s.trim = False  # a graph's shapes are fixed: it attends to the whole cache
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                s.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            s.logits = s.step()
        torch.cuda.synchronize()
        self._graph = graph
        self.captures += 1
        self.warmup_seconds += time.perf_counter() - t0
