"""The torch slot loop: a fixed number of slots over a per-slot KV cache (`StaticStep`, whose
slots each keep their own position and cache index). Entries entering free slots at the same
time are prefilled in one left-padded batch; each one's unpadded keys and values are copied
into its slot and its first token drawn from the prefill's logits. Every step then advances the
busy slots at once: as a plain call over the first slots, where the busy ones are kept, or,
under --compile on CUDA, as one replayed CUDA graph over all of them.

Each slot carries its entry's steering vector, sampling settings, count of answer tokens (which
picks the entry's own draw) and seen tokens, so an entry's answer equals its solo run. A token
whose hidden state is captured is reported after the step that feeds it (its own position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pertoken.backends.base import TokenStep
from pertoken.backends.generation import Entry
from pertoken.backends.plan import left_pad, steer_mask
from pertoken.backends.prefix_cache import PrefixCache
from pertoken.backends.schedule import Waiting
from pertoken.backends.torch.batch import batch_tensors
from pertoken.backends.torch.compiled import Shape, StaticStep, bind
from pertoken.backends.torch.hooks import TapState
from pertoken.backends.torch.sampling import SlotSampler
from pertoken.backends.torch.steering import copy_slots, move_slot, ops_with, set_slot, steer_state


@dataclass
class Prefilled:
    """One prompt after its prefill: what a slot needs to start decoding it."""

    ids: list[int]
    logits: torch.Tensor  # [1, vocab] float32 at the last prompt position
    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per block [1, kv_heads, T, head_dim]


@dataclass
class _Slot:
    entry: Entry
    rows: frozenset[int] = frozenset()  # the rows its plan steers
    pending: tuple | None = None  # (index, token, logprobs) waiting for its hidden state
    draining: bool = False  # its last token is fed once more, for its hidden state


class Slots:
    """B slots over one StaticStep: insert entries, step until none is busy.

    `step_source(shape)` gives (StaticStep, run): the step and how to run one decode step
    (a graph replay, or the step itself); the caller holds `residual_taps(model, state)`."""

    def __init__(self, model, shape: Shape, state: TapState, stop_ids, pad_id, steps,
                 on_flush=None, prefix: PrefixCache | None = None):  # fmt: skip
        self.model, self.state, self.pad_id, self.on_flush = model, state, pad_id, on_flush
        self.prefix = prefix
        self.dtype = next(model.parameters()).dtype
        self.steps, self.most = steps, shape.batch  # slots grow up to `most` as entries wait
        self.step_buf, self.run = steps(Shape(1, shape.length, shape.rows, shape.ops), state)
        self.home = self.step_buf.tokens.device
        self.rows = list(shape.rows)
        shape = self.step_buf.shape  # a compiled step may hold more slots than asked
        B = shape.batch
        self.slots: list[_Slot | None] = [None] * B
        self.idle = torch.ones(B, 1, dtype=torch.bool, device=self.home)
        self.stop_ids = stop_ids.to(self.home)
        self.stops = set(stop_ids.tolist())
        self.sampler = SlotSampler(B, shape.length, self.home)
        self.waiting: Waiting[Prefilled] = Waiting()
        self.width = 0  # the slots the last step ran

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    @property
    def tapped(self) -> bool:
        """Whether the next step may steer or capture (needs the residual hooks)."""
        return (
            bool(self.rows)
            or any(e.plan is not None for e in self.waiting.order)
            or any(x is not None and x.rows for x in self.slots)
        )

    def insert(self, entry: Entry) -> None:
        self.waiting.add(entry)

    def step(self) -> None:
        self._drop_cancelled()
        self._fill()
        if self.on_flush is not None:  # first tokens go out before the decode step
            self.on_flush()
        if any(s is not None for s in self.slots):
            self._compact()
            self._decode()
        if not self.busy:
            self._widen()
        if self.on_flush is not None:
            self.on_flush()

    # ---------------------------------------------------------------- admission
    def _fill(self) -> None:
        """Prefill waiting entries into free slots, together (one that ends at once frees
        its slot again)."""
        self._widen()
        while self.waiting and None in self.slots:
            free = [b for b, s in enumerate(self.slots) if s is None]
            taken = self.waiting.take(len(free), self._prefill)
            if not taken:
                return
            slots = free[: len(taken)]
            self._fit(max(len(e.ids) + e.max_new_tokens + 1 for e, _ in taken))
            self._fit_ops([e.plan for e, _ in taken])
            for b, (e, pre) in zip(slots, taken):
                self._load(b, e, pre)
            logits = torch.cat([pre.logits for _, pre in taken])  # [n, vocab]
            stops = self.stop_ids[self.stop_ids < logits.shape[-1]]
            barred = logits.index_fill(-1, stops, float("-inf"))  # an answer has a token
            self._draw(logits, barred, slots)

    def _fit(self, need: int) -> None:
        """Grow the step's cache (doubling) until it holds `need` positions per slot."""
        L = self.step_buf.shape.length
        if need > L:
            while L < need:
                L *= 2
            self._resize(len(self.slots), L)

    def _fit_ops(self, plans) -> None:
        """Widen the step's steering buffers where these plans ablate or cap (operator
        stages, as the step's shape); a loop keeps them once it has them."""
        ops = ops_with(self.step_buf.shape.ops, plans)
        if ops != self.step_buf.shape.ops:
            self._resize(len(self.slots), self.step_buf.shape.length, ops)

    def _resize(self, B: int, L: int, ops=None) -> None:
        """A step of B slots and L positions (a compiled source may give more slots), the
        first slots (where every busy one is) carried over: keys, values, positions,
        steering and draws."""
        old = self.step_buf
        ops = old.shape.ops if ops is None else ops
        new, self.run = self.steps(Shape(B, L, old.shape.rows, ops), self.state)
        if new is old:  # a compiled source's kept step already holds these
            return
        B = new.shape.batch
        n, L0 = min(B, old.shape.batch), old.shape.length
        for a, b in zip(old.cache.layers, new.cache.layers, strict=True):
            if a.is_initialized:
                if not b.is_initialized:
                    b.lazy_initialization(a.keys[:1].expand(B, -1, -1, -1), a.values[:1])
                b.keys[:n, :, :L0] = a.keys[:n]
                b.values[:n, :, :L0] = a.values[:n]
        new.key_pos.fill_(-1)
        new.key_pos[:n, :L0] = old.key_pos[:n]
        for name in ("tokens", "pos", "slot", "steer_on"):
            getattr(new, name)[:n] = getattr(old, name)[:n]
        for row, buf in new.steer.items():
            copy_slots(buf, old.steer[row], n)
        self.step_buf = new
        self.slots = self.slots[:n] + [None] * (B - n)
        idle = torch.ones(B, 1, dtype=torch.bool, device=self.home)
        idle[:n] = self.idle[:n]
        self.idle = idle
        self.sampler.resize(B, new.shape.length)

    def _widen(self) -> None:
        """More slots when entries wait and every slot is busy (up to `most`); back to one
        when the loop has emptied."""
        busy = sum(x is not None for x in self.slots)
        B = len(self.slots)
        want = min(self.most, busy + len(self.waiting.order)) if self.waiting else 1
        if want > B or (want == 1 and not busy and B > 1):
            self._resize(want, self.step_buf.shape.length)

    def _compact(self) -> None:
        """Busy slots first: the last busy slot moves into each free slot below it, so a
        plain step runs over the busy slots only (a graph replay runs them all anyway)."""
        if not self.step_buf.trim:
            return
        while True:
            free = [b for b, x in enumerate(self.slots) if x is None]
            busy = [b for b, x in enumerate(self.slots) if x is not None]
            if not free or not busy or free[0] > busy[-1]:
                return
            self._move(busy[-1], free[0])

    def _move(self, src: int, dst: int) -> None:
        """Slot src's keys, values, positions, steering and draws into the free slot dst."""
        s = self.step_buf
        for layer in s.cache.layers:
            if layer.is_initialized:
                layer.keys[dst], layer.values[dst] = layer.keys[src], layer.values[src]
        for name in ("tokens", "pos", "slot", "key_pos", "steer_on"):
            getattr(s, name)[dst] = getattr(s, name)[src]
        for buf in s.steer.values():
            move_slot(buf, src, dst)
        self.sampler.move(src, dst)
        self.slots[dst], self.slots[src] = self.slots[src], None
        self.idle[dst], self.idle[src] = False, True

    def _prefill(self, entries: list[Entry]) -> list[Prefilled]:
        """Each prompt's keys, values and last logits: those with a cached prefix compute only
        what follows it, the others run in one left-padded batch; all are cached after."""
        if self.prefix is None:
            return self._prefill_batch(entries)
        hits = [self.prefix.lookup(e.ids, e.plan) for e in entries]
        out = self._prefill_after(entries, hits)
        for e, pre in zip(entries, out):
            kv = [(k[:, :, :-1].clone(), v[:, :, :-1].clone()) for k, v in pre.kv]
            nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
            self.prefix.store(e.ids[:-1], e.plan, kv, nbytes)
        return out

    def _prefill_after(self, entries: list[Entry], hits: list[tuple[int, object]]):
        """Prompts whose first P tokens' keys and values are given (P may be 0): only the
        rest of each runs, in one left-padded batch whose padding writes a spare slot."""
        k, T = len(entries), max(len(e.ids) for e in entries)
        n = [len(e.ids) - P for e, (P, _) in zip(entries, hits)]  # tokens each computes
        S = max(n)
        one = StaticStep(self.model, Shape(k, T + 1, ()), self.dtype)  # slot T: padding
        ids = torch.full((k, S), self.pad_id, dtype=torch.long)
        pos, slots = torch.zeros(k, S, dtype=torch.long), torch.full((k, S), T)
        mask = torch.zeros(k, S, dtype=torch.bool)
        one.key_pos.fill_(-1)
        for b, (e, (P, _)) in enumerate(zip(entries, hits)):
            ids[b, S - n[b] :] = torch.tensor(e.ids[P:])
            pos[b, S - n[b] :] = slots[b, S - n[b] :] = torch.arange(P, len(e.ids))
            one.key_pos[b, : len(e.ids)] = torch.arange(len(e.ids))
            if e.plan is not None:
                rule = steer_mask(len(e.ids), len(e.ids), e.plan.positions)[P:]
                mask[b, S - n[b] :] = torch.from_numpy(rule)
        self._load_prefixes(one, hits)
        saved = self.state.steer, self.state.steer_mask, self.state.on_row
        self.state.steer = steer_state(self.model, [e.plan for e in entries])
        self.state.steer_mask, self.state.on_row = mask.to(self.home), None
        try:
            logits = one.forward(*(x.to(self.home) for x in (ids, pos, slots)))  # [k, vocab]
        finally:
            self.state.steer, self.state.steer_mask, self.state.on_row = saved
        out = []
        for b, e in enumerate(entries):
            e.prefilled = n[b]
            kv = [(lay.keys[b : b + 1, :, : len(e.ids)], lay.values[b : b + 1, :, : len(e.ids)])
                  for lay in one.cache.layers]  # fmt: skip
            out.append(Prefilled(e.ids, logits[b : b + 1], kv))
        return out

    def _load_prefixes(self, one: StaticStep, hits) -> None:
        """Copy each slot's cached prefix into the prefill step's cache (allocating it)."""
        B = one.shape.batch
        for b, (P, kv) in enumerate(hits):
            if not P:
                continue
            for layer, (k, v) in zip(one.cache.layers, kv, strict=True):
                if not layer.is_initialized:
                    layer.lazy_initialization(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
                layer.keys[b, :, :P], layer.values[b, :, :P] = k[0, :, :P], v[0, :, :P]

    def _prefill_batch(self, entries: list[Entry]) -> list[Prefilled]:
        """These prompts in one left-padded batch, each with its own steering; each comes out
        with its own unpadded keys and values."""
        seqs, plans = [e.ids for e in entries], [e.plan for e in entries]
        batch = left_pad(seqs, self.pad_id)
        one = StaticStep(self.model, Shape(*batch.ids.shape, ()), self.dtype)
        saved = self.state.steer, self.state.steer_mask, self.state.on_row
        self.state.steer, self.state.steer_mask = steer_state(self.model, plans), None
        self.state.on_row = None
        if self.state.steer:
            mask = batch.steer_mask([p.positions if p else "all" for p in plans])
            self.state.steer_mask = torch.from_numpy(mask).to(self.home)  # [k, T]
        try:
            logits = one.prefill(*batch_tensors(batch, self.home))  # [k, vocab]
        finally:
            self.state.steer, self.state.steer_mask, self.state.on_row = saved
        for e in entries:
            e.prefilled = len(e.ids)
        kv = [(lay.keys, lay.values) for lay in one.cache.layers]  # [k, kv_heads, T, head_dim]
        return [
            Prefilled(
                s, logits[b : b + 1], [(k[b : b + 1, :, p:], v[b : b + 1, :, p:]) for k, v in kv]
            )
            for b, (s, p) in enumerate(zip(seqs, batch.pad.tolist()))
        ]

    def _load(self, b: int, e: Entry, pre: Prefilled) -> None:
        """Copy a prefilled prompt into slot b and point the slot's buffers at it."""
        T, s, B = len(pre.ids), self.step_buf, len(self.slots)
        for layer, (k, v) in zip(s.cache.layers, pre.kv, strict=True):
            if not layer.is_initialized:
                layer.lazy_initialization(k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1))
            layer.keys[b, :, :T] = k[0]
            layer.values[b, :, :T] = v[0]
        s.key_pos[b] = -1
        s.key_pos[b, :T] = torch.arange(T, device=self.home)
        s.pos[b], s.slot[b] = T, T
        set_slot(s.steer, b, e.plan)
        s.steer_on[b] = e.plan is not None and e.plan.positions != "prompt"
        self.sampler.load(b, e, pre.logits.shape[-1])
        self.slots[b] = _Slot(e, frozenset(e.plan.stages()) if e.plan is not None else frozenset())
        self.idle[b] = False

    # ---------------------------------------------------------------- decoding
    def _decode(self) -> None:
        """One step: every slot feeds its token; captured tokens are reported with their
        states; then each busy slot draws its next token."""
        s = self.step_buf
        if s.trim:  # a plain step: over the busy slots only, which _compact put first
            view = s.first(max(b for b, x in enumerate(self.slots) if x is not None) + 1)
            bind(self.state, view)
            self.state.steer = self._steered(view)
            logits = view.step()  # [w, vocab] float32
        else:
            self.state.steer = self._steered(s)
            logits = self.run()  # [B, vocab] float32
        self.width = logits.shape[0]
        s.slot.masked_fill_(self.idle, 0)  # idle slots write slot 0, never read
        s.pos.masked_fill_(self.idle, 0)
        if any(x is not None and x.pending for x in self.slots):
            hidden = s.captured.cpu().numpy().copy()  # [B, len(rows), hidden]; a copy
            for b, x in enumerate(self.slots):
                if x is not None and x.pending:
                    self._report(b, *x.pending, hidden[b])
                    if self.slots[b] is not None and self.slots[b].draining:
                        self._end(b)
        live = [b for b, x in enumerate(self.slots) if x is not None]
        if live:
            at = torch.tensor(live, device=self.home)
            self._draw(logits[at], logits[at], live)

    def _steered(self, step: StaticStep) -> dict:
        """The step's steering buffers of the rows some busy slot steers: a plain step skips
        the others (adding their zeros changes nothing); a graph replay reads them all."""
        rows = frozenset().union(*(x.rows for x in self.slots if x is not None))
        return {r: buf for r, buf in step.steer.items() if r in rows}

    def _draw(self, raw: torch.Tensor, logits: torch.Tensor, slots: list[int]) -> None:
        """Each of these slots draws from its logits [n, vocab] (raw: the model's own, for
        logprobs) and takes its token."""
        at = torch.tensor(slots, device=self.home)
        tokens = self.sampler(logits, at, slots)  # [n]
        self.step_buf.tokens[at, 0] = tokens  # the next step's input, on the device
        lps = _logprobs(raw, tokens, [self.slots[b].entry.logprobs for b in slots])
        for j, (b, t) in enumerate(zip(slots, tokens.tolist())):
            self._take(b, t, None if lps is None else lps[j])

    def _take(self, b: int, token: int, lp) -> None:
        """Slot b drew `token`: a stop or the last allowed token ends its answer."""
        x = self.slots[b]
        e = x.entry
        if token in self.stops:
            return self._end(b)
        e.answer.append(token)
        last = len(e.answer) >= e.max_new_tokens
        if e.hidden and self.rows:
            x.pending, x.draining = (len(e.answer) - 1, token, lp), last
            return
        self._report(b, len(e.answer) - 1, token, lp, None)
        if last and self.slots[b] is not None:
            self._end(b)

    def _report(self, b: int, index: int, token: int, lp, hidden) -> None:
        x = self.slots[b]
        x.pending = None
        e = x.entry
        if e.on_step is None:
            return
        step = TokenStep(e.prompt, index, token, hidden)
        if lp is not None:
            step.logprob, step.top = lp
        if e.on_step(step) is False:
            self._end(b)

    def _end(self, b: int) -> None:
        e = self.slots[b].entry
        self.slots[b] = None
        self.idle[b] = True
        self.sampler.free(b)
        e.on_end(e)

    def _drop_cancelled(self) -> None:
        for b, x in enumerate(self.slots):
            if x is not None and x.entry.cancelled:
                self._end(b)


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, wants: list[int | None]):
    """Per slot (logprob of its token, [(id, logprob)] best first or None), or None for all,
    under the model's own distribution."""
    if all(k is None for k in wants):
        return None
    lp = torch.log_softmax(raw, -1)  # [n, vocab]
    chosen = lp.gather(-1, tokens[:, None])[:, 0].tolist()
    k = max((w for w in wants if w), default=0)
    top = lp.topk(min(k, lp.shape[-1]), dim=-1) if k else None  # sorted, best first
    ids = top.indices.tolist() if top is not None else None
    vals = top.values.tolist() if top is not None else None
    return [
        None if w is None else (chosen[j], list(zip(ids[j][:w], vals[j][:w])) if w else None)
        for j, w in enumerate(wants)
    ]
