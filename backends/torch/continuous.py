"""Continuous batching for transformers models: a fixed number of slots over a per-slot KV
cache (the compiled step's `StaticStep`, whose rows each keep their own position and cache
slot). Prompts entering free slots at the same time are prefilled in one left-padded batch;
each one's unpadded keys and values are copied into its slot and its first token drawn from
the prefill's logits; every decode step then advances all slots at once.

Each slot carries its prompt's steering vector, its count of answer tokens (which picks the
prompt's own draw in `uniforms`) and its seen tokens, so a prompt's answer equals its solo run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pertoken.backends.base import Sampling, Steer
from pertoken.backends.plan import left_pad
from pertoken.backends.schedule import Queue, prefix_keys
from pertoken.backends.torch.compiled import Shape, StaticStep
from pertoken.backends.torch.decode import batch_tensors
from pertoken.backends.torch.hooks import TapState
from pertoken.backends.torch.sampling import choose, penalize
from pertoken.backends.torch.steering import set_line, steer_buffers


@dataclass
class Prefilled:
    """One prompt after its prefill: what a slot needs to start decoding it."""

    ids: list[int]
    logits: torch.Tensor  # [1, vocab] float32 at the last prompt position
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block [1, kv_heads, T, head_dim]


@dataclass
class Request:
    """Everything one call asks of the slots."""

    seqs: list[list[int]]
    plans: list[Steer | None]
    uniforms: np.ndarray | None  # [N, max_new_tokens] per-prompt draws; None when greedy
    sampling: Sampling
    max_new_tokens: int
    stop_ids: torch.Tensor  # [S]
    pad_id: int
    on_answer: Callable[[int, list[int]], None] | None = None  # (prompt, its ids) as each ends


class Slots:
    """B decode slots over one StaticStep; `run` answers a whole request."""

    def __init__(self, model, req: Request, B: int, state: TapState):
        self.model, self.req, self.state = model, req, state
        self.dtype = next(model.parameters()).dtype
        length = max(map(len, req.seqs)) + req.max_new_tokens
        self.step = StaticStep(model, Shape(B, length, ()), self.dtype)
        self.home = self.step.tokens.device
        self.vectors = steer_buffers(model, req.plans, B)  # row -> [B, hidden] or RowOps
        self.on = torch.zeros(B, 1, dtype=torch.bool, device=self.home)  # steered slots
        self.idle = torch.ones(B, 1, dtype=torch.bool, device=self.home)  # slots with no prompt
        self.rows: list[int | None] = [None] * B  # the prompt each slot decodes
        self.count = np.zeros(B, dtype=np.int64)  # answer tokens each slot has drawn
        self.seen = None  # [B, vocab] bool, only with a repetition penalty
        self.stops = set(req.stop_ids.tolist())
        self.answers: list[list[int]] = [[] for _ in req.seqs]
        self.queue: Queue[Prefilled] = Queue(
            prefix_keys(req.seqs, req.plans), [len(q) for q in req.seqs]
        )
        self.draws = _Draws(req, B, self.home)

    def run(self) -> list[list[int]]:
        every = torch.arange(len(self.rows), device=self.home)
        self._fill()
        while any(i is not None for i in self.rows):
            self._decode_mode()
            logits = self.step.step()  # [B, vocab] float32
            self.step.slot.masked_fill_(self.idle, 0)  # idle slots write slot 0, never read
            self.step.pos.masked_fill_(self.idle, 0)
            tokens = self._draw(logits, every, first=False)  # [B]
            self.step.tokens.copy_(tokens[:, None])  # the next step's input, on the device
            for b, t in enumerate(tokens.tolist()):
                if self.rows[b] is not None:
                    self._take(b, t)
            self._fill()
        return self.answers

    # ---------------------------------------------------------------- admission
    def _fill(self) -> None:
        """Prefill waiting prompts into free slots, together (one that ends at once frees
        its slot again)."""
        while self.queue and None in self.rows:
            free = [b for b, i in enumerate(self.rows) if i is None]
            taken = self.queue.take(len(free), self._prefill)
            slots = free[: len(taken)]
            for b, (i, pre) in zip(slots, taken):
                self._load(b, i, pre)
            logits = torch.cat([pre.logits for _, pre in taken])  # [len(taken), vocab]
            at = torch.tensor(slots, device=self.home)
            tokens = self._draw(logits, at, first=True)  # [len(taken)]
            self.step.tokens[at, 0] = tokens
            for b, t in zip(slots, tokens.tolist()):
                self._take(b, t)

    def _prefill(self, idx: list[int]) -> list[Prefilled]:
        """These prompts in one left-padded batch, each with its own steering; each comes out
        with its own unpadded keys and values."""
        seqs, plans = [self.req.seqs[i] for i in idx], [self.req.plans[i] for i in idx]
        batch = left_pad(seqs, self.req.pad_id)
        one = StaticStep(self.model, Shape(*batch.ids.shape, ()), self.dtype)
        self.state.steer, self.state.steer_mask = steer_buffers(self.model, plans, len(plans)), None
        for b, plan in enumerate(plans):
            set_line(self.state.steer, b, plan)
        if self.state.steer:
            mask = batch.steer_mask([p.positions if p else "all" for p in plans])
            self.state.steer_mask = torch.from_numpy(mask).to(self.home)  # [k, T]
        logits = one.prefill(*batch_tensors(batch, self.home))  # [k, vocab]
        kv = [(lay.keys, lay.values) for lay in one.cache.layers]  # [k, kv_heads, T, head_dim]
        return [
            Prefilled(
                s, logits[b : b + 1], [(k[b : b + 1, :, p:], v[b : b + 1, :, p:]) for k, v in kv]
            )
            for b, (s, p) in enumerate(zip(seqs, batch.pad.tolist()))
        ]

    def _load(self, b: int, i: int, pre: Prefilled) -> None:
        """Copy a prefilled prompt into slot b and point the slot's buffers at it."""
        T, s, B = len(pre.ids), self.step, len(self.rows)
        for layer, (k, v) in zip(s.cache.layers, pre.kv, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
            layer.keys[b, :, :T] = k[0]
            layer.values[b, :, :T] = v[0]
        s.key_pos[b] = -1
        s.key_pos[b, :T] = torch.arange(T, device=self.home)
        s.pos[b], s.slot[b] = T, T
        plan = self.req.plans[i]
        set_line(self.vectors, b, plan)
        self.on[b] = plan is not None and plan.positions != "prompt"
        if self.req.sampling.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(B, pre.logits.shape[-1], dtype=torch.bool)
                self.seen = self.seen.to(self.home)
            self.seen[b] = False
            self.seen[b, torch.tensor(pre.ids, device=self.home)] = True
        self.rows[b], self.count[b] = i, 0
        self.idle[b] = False
        self.draws.load(b, i)

    # ---------------------------------------------------------------- decoding
    def _decode_mode(self) -> None:
        self.state.steer, self.state.steer_mask = self.vectors, self.on

    def _draw(self, logits: torch.Tensor, slots: torch.Tensor, first: bool) -> torch.Tensor:
        """Tokens [n] from logits [n, vocab] of these slots [n], each slot at its own draw."""
        s, req = self.req.sampling, self.req
        if first:  # an answer has at least one token
            stops = req.stop_ids[req.stop_ids < logits.shape[-1]]
            logits = logits.index_fill(-1, stops, float("-inf"))
        if self.seen is not None:
            logits = penalize(logits, self.seen[slots], s.repetition_penalty)
        tokens = choose(logits, s, None, self.draws.next(slots))
        if self.seen is not None:
            self.seen[slots, tokens] = True
        return tokens

    def _take(self, b: int, token: int) -> None:
        """Slot b drew `token`: a stop or the last allowed token ends its answer."""
        i = self.rows[b]
        if token not in self.stops:
            self.answers[i].append(token)
            self.count[b] += 1
            if self.count[b] < self.req.max_new_tokens:
                return
        self.rows[b] = None
        self.idle[b] = True
        if self.req.on_answer is not None:
            self.req.on_answer(i, self.answers[i])


class _Draws:
    """Each slot's next uniform draw, on the device: its prompt's row of `uniforms` at the
    slot's count of draws, so a step reads its draws without building them on the host."""

    def __init__(self, req: Request, B: int, home: torch.device):
        self.on = req.uniforms is not None and req.sampling.temperature > 0
        if self.on:
            wide = torch.float32 if home.type == "mps" else torch.float64  # no f64 on MPS
            self.table = torch.from_numpy(req.uniforms).to(home, wide)  # [N, max_new_tokens]
            self.prompt = torch.zeros(B, dtype=torch.long, device=home)
            self.count = torch.zeros(B, dtype=torch.long, device=home)

    def load(self, b: int, i: int) -> None:
        if self.on:
            self.prompt[b], self.count[b] = i, 0

    def next(self, slots: torch.Tensor) -> torch.Tensor | None:
        """The draws [n] of these slots, each slot's count then moving on by one (an idle
        slot's draw is never read)."""
        if not self.on:
            return None
        last = self.table.shape[1] - 1
        u = self.table[self.prompt[slots], self.count[slots].clamp(max=last)]
        self.count[slots] += 1
        return u
