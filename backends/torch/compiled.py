"""The compiled decode step: one token per row through a static KV cache, with its inputs,
steering and captured states in preallocated device buffers, captured once as a CUDA graph and
replayed for every token.

The step reads everything that changes from one token or one call to the next (the token, its
position and cache slot, the positions each slot holds, every block's steering vector per row
and whether this token is steered) from buffers that are copied into, never replaced, so a new
prompt, vector, coefficient or layer needs no new capture. Only the batch size, the cache
length and the captured rows decide a capture. Without CUDA (or on a sharded model) the same
step runs as plain calls, which is what the tests compare with the eager decode loop.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from pertoken.backends.plan import PaddedBatch
from pertoken.backends.torch.decode import DecodeOptions, batch_tensors, steer_tensor
from pertoken.backends.torch.hooks import RowOps, TapState, block_devices, input_device
from pertoken.backends.torch.sampling import Sampler
from pertoken.backends.torch.static_cache import SlotCache, attention_masks, check_attention
from pertoken.backends.torch.steering import ops_shape
from pertoken.errors import PertokenWarning

LENGTH_STEP = 256  # cache lengths round up to this, so calls of similar length share a capture


@dataclass(frozen=True)
class Shape:
    batch: int
    length: int  # cache slots per row
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
        # one vector per steerable row and batch row, on its block's device: zero where
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

    def grab(self, row: int, h: torch.Tensor) -> None:
        """Keeps the last position's state of a captured row (called by the hooks)."""
        self.captured[:, self.shape.rows.index(row)].copy_(h[:, -1].float())

    def forward(self, ids, pos, slots) -> torch.Tensor:
        """ids, pos, slots [B, T] -> last position's logits [B, vocab] float32."""
        self.cache.slots = slots
        masks = attention_masks(self.model.config, self.key_pos, pos, slots, self.dtype)
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
        """One token per row from the buffers; advances position and slot on the device."""
        self.key_pos.scatter_(1, self.slot, self.pos)
        logits = self.forward(self.tokens, self.pos, self.slot)
        self.pos.add_(1)
        self.slot.add_(1)
        return logits


class CompiledDecoder:
    """Decodes like `decode.decode`, through a StaticStep captured as a CUDA graph on CUDA.

    `warmup_seconds` adds up the time spent capturing (once per batch size and cache length
    while the model stays loaded); `captures` counts them."""

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

    def decode(
        self,
        batch: PaddedBatch,
        state: TapState,
        opts: DecodeOptions,
        gen=None,
        on_token: Callable[[list[int]], None] | None = None,
        check_every: int = 16,
    ) -> list[list[int]]:
        """The same answers as `decode.decode(model, batch, state, opts, gen, on_token)`.

        Called inside `residual_taps(model, state)`: while it runs, the hooks read the step's
        buffers; the caller's steering is copied into them and its rows are reported after
        each step from the states the step captured."""
        B, T0 = batch.ids.shape
        rows, ops = tuple(sorted(state.rows)), ops_shape(state.steer)
        step = self._ready(B, T0 + opts.max_new_tokens, rows, ops)
        full = _pad_rows(batch, step.shape.batch, opts.pad_id)
        _load_steering(step, state, opts.positions, B)
        report = _Report(state.on_row, step, B)
        with _bound(state, step):
            if self.graphs and self._graph is None:
                self._capture()
            ids, attn, pos = batch_tensors(full, step.tokens.device)  # [rows, T0] each
            state.steer_mask = steer_tensor(full, opts.positions, ids.device)
            logits = step.prefill(ids, attn, pos)  # eager: its length changes from call to call
            state.steer_mask = step.steer_on
            sample = Sampler(opts.sampling, opts.stop_ids, gen)
            sample.start(ids[:B], attn[:B], logits.shape[-1])  # the real rows' prompts
            loop = _Loop(self.run, step, report, opts, sample, on_token, check_every)
            return loop.answers(logits, B)

    def run(self) -> torch.Tensor:
        """One decode step: replay the graph, or call the step."""
        if self._graph is None:
            return self._step.step()
        self._graph.replay()
        return self._step.logits

    def _ready(self, B: int, length: int, rows: tuple[int, ...], ops=()) -> StaticStep:
        """The step for this call: the current one when it fits (fewer rows are padded: a
        decode step costs about the same for any batch up to the one captured), else a new one."""
        s = self._step
        same = s and (s.shape.rows, s.shape.ops) == (rows, ops)
        if same and B <= s.shape.batch and length <= s.shape.length:
            return s
        self._step = self._graph = None  # free the old buffers before allocating new ones
        if self.graphs:
            torch.cuda.empty_cache()
        L = -(-length // LENGTH_STEP) * LENGTH_STEP
        self._step = StaticStep(self.model, Shape(B, L, rows, ops), self.dtype)
        return self._step

    def _capture(self) -> None:
        """Capture the step as a CUDA graph after two warm-up runs on a side stream. The
        warm-up writes garbage that the next prefill resets (positions, slots, key positions)."""
        s, t0 = self._step, time.perf_counter()
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


def _pad_rows(batch: PaddedBatch, rows: int, pad_id: int) -> PaddedBatch:
    """The batch with one-token padding rows added up to the step's batch size."""
    extra = rows - batch.ids.shape[0]
    if extra == 0:
        return batch
    ids = np.full((extra, batch.ids.shape[1]), pad_id, dtype=batch.ids.dtype)
    mask = np.zeros(ids.shape, dtype=bool)
    mask[:, -1] = True
    return PaddedBatch(
        np.concatenate([batch.index, np.full(extra, -1)]),
        np.concatenate([batch.ids, ids]),
        np.concatenate([batch.mask, mask]),
        np.concatenate([batch.prompt_lens, np.ones(extra, np.int64)]),
    )


def _load_steering(step: StaticStep, state: TapState, positions, B: int) -> None:
    """Copies the caller's vectors ([hidden] or [B, hidden] per row) into the step's buffers;
    decode steps are steered unless a row steers its prompt only."""
    for row, buf in step.steer.items():
        if isinstance(buf, RowOps):
            buf.load(state.steer.get(row), B)
            continue
        buf.zero_()
        if row in state.steer:
            buf[:B].copy_(state.steer[row].to(buf.device, buf.dtype).expand(B, -1))
    per_row = [positions] * B if isinstance(positions, str) else list(positions)
    step.steer_on.zero_()
    step.steer_on[:B, 0] = torch.tensor([p != "prompt" for p in per_row])


@contextmanager
def _bound(state: TapState, step: StaticStep):
    """Points the hooks' state at the step's buffers for the duration; restores it after."""
    saved = state.steer, state.steer_mask, state.on_row
    state.steer, state.steer_mask = step.steer, step.steer_on
    state.on_row = step.grab if step.shape.rows else None
    try:
        yield
    finally:
        state.steer, state.steer_mask, state.on_row = saved


class _Report:
    """Hands the caller's `on_row` each step's captured states, as the hooks would: views of a
    buffer the next step overwrites, so a caller copies what it keeps."""

    def __init__(self, on_row, step: StaticStep, B: int):
        self.on_row, self.step, self.B = on_row, step, B

    def __call__(self) -> None:
        if self.on_row is None:
            return
        for j, row in enumerate(self.step.shape.rows):
            self.on_row(row, self.step.captured[: self.B, j : j + 1])  # [B, 1, hidden]


@dataclass
class _Loop:
    """The decode loop of `decode.decode` over the static step: same sampling, same stops."""

    run: Callable[[], torch.Tensor]
    step: StaticStep
    report: _Report
    opts: DecodeOptions
    sample: Sampler
    on_token: Callable[[list[int]], None] | None
    check_every: int

    def answers(self, logits: torch.Tensor, B: int) -> list[list[int]]:
        opts, tokens = self.opts, self.step.tokens
        done = torch.zeros(B, dtype=torch.bool, device=tokens.device)
        uniforms = getattr(opts, "uniforms", None)  # [B, steps] when rows carry their own seeds
        toks, keep = [], []  # per step: [B] ids, [B] whether the id belongs to the answer
        for n in range(opts.max_new_tokens):
            # only the real rows draw, so the generator's stream is the eager loop's
            u = None if uniforms is None else uniforms[:, n]
            tok = self.sample(logits[:B], first=n == 0, u=u)
            tok = torch.where(done, torch.full_like(tok, opts.pad_id), tok)
            stopped = torch.isin(tok, opts.stop_ids)
            toks.append(tok)
            keep.append(~(done | stopped))
            done |= stopped
            if n == opts.max_new_tokens - 1 and not opts.feed_last:
                break
            every = self.on_token is not None
            if (every or (n + 1) % self.check_every == 0) and bool(done.all()):
                break
            if self.on_token is not None:
                self.on_token(tok.tolist())
            tokens[:B, 0] = tok  # padding rows go on feeding what they were given
            logits = self.run()
            self.report()
        ids = torch.stack(toks, 1).tolist()  # [B, steps]
        mask = torch.stack(keep, 1).tolist()
        return [[t for t, k in zip(r, m) if k] for r, m in zip(ids, mask)]
