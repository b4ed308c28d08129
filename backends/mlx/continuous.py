"""The MLX slot loop over mlx-lm's `BatchKVCache`: entries entering free slots at the same time
are prefilled in one left-padded batch; each one's unpadded cache is appended to the decoding
batch by `extend` (left-padded so all slots end together); `filter` drops slots whose answers
ended. The batch never holds more than `slots` slots, and every step advances all of them.

Each slot carries its entry's steering, sampling settings, count of answer tokens (which picks
the entry's own draw) and seen tokens, so an entry's answer equals its solo run. A token whose
hidden state is captured is reported after the step that feeds it (its own position).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache, KVCache

from pertoken.backends.base import TokenStep
from pertoken.backends.generation import Entry
from pertoken.backends.mlx.batch import SteerPlan, step_pass, window_of
from pertoken.backends.mlx.models.residual import Pass, attend_mask
from pertoken.backends.mlx.prefill import CHUNK, prefill
from pertoken.backends.mlx.sampling import choose, penalize
from pertoken.backends.plan import left_pad, steer_mask
from pertoken.backends.prefix_cache import PrefixCache
from pertoken.backends.schedule import Waiting


@dataclass
class Prefilled:
    """One prompt after its prefill: its cache (never written again) and last logits."""

    cache: list[BatchKVCache]
    logits: mx.array  # [1, vocab]


@dataclass
class _Slot:
    entry: Entry
    token: int = 0  # what the slot feeds next
    pending: tuple | None = None  # (index, token, logprobs) waiting for its hidden state
    draining: bool = False  # its last token is fed once more, for its hidden state
    done: bool = False


class Grab:
    """Keeps the last position of chosen rows during one forward."""

    def __init__(self, rows: list[int]):
        self.rows, self.got = rows, {}

    def __call__(self, row: int, h: mx.array) -> None:
        if row in self.rows:
            self.got[row] = h[:, -1].astype(mx.float32)  # [B, hidden]

    def stacked(self) -> mx.array:
        return mx.stack([self.got[r] for r in self.rows], axis=1)  # [B, R, hidden]


class Slots:
    """Up to `slots` slots decoding together: insert entries, step until none is busy."""

    def __init__(self, model, slots: int, *, rows, stop, hidden_size, dtype, chunk=CHUNK,
                 on_flush=None, prefix: PrefixCache | None = None):  # fmt: skip
        self.model, self.slots, self.capture = model, slots, list(rows)
        self.stop, self.hidden_size, self.dtype, self.chunk = set(stop), hidden_size, dtype, chunk
        self.on_flush, self.prefix = on_flush, prefix
        self.window = window_of(model)
        self.cache: list[BatchKVCache] | None = None  # one per block, a slot per entry
        self.live: list[_Slot] = []
        self.seen: mx.array | None = None  # [slots, vocab] bool, once a slot has a penalty
        self.bias: mx.array | None = None  # [slots, vocab] float32, once a slot has a bias
        self.steer: dict = {}  # Pass fields for the slots as they stand
        self.waiting: Waiting[Prefilled] = Waiting()

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or bool(self.live)

    def insert(self, entry: Entry) -> None:
        self.waiting.add(entry)

    def step(self) -> None:
        for r in self.live:
            if r.entry.cancelled:
                self._end(r)
        self._keep()
        self._fill()
        if self.on_flush is not None:  # first tokens go out before the decode step
            self.on_flush()
        if self.live:
            self._decode()
        if self.on_flush is not None:
            self.on_flush()

    # ---------------------------------------------------------------- admission
    def _fill(self) -> None:
        """Admit waiting entries into free slots, prefilled together; each new slot draws its
        first token from its prefill's logits (a stop token barred)."""
        while self.waiting and len(self.live) < self.slots:
            taken = self.waiting.take(self.slots - len(self.live), self._prefill)
            if not taken:
                return
            start = len(self.live)
            for e, pre in taken:
                self._append(e, pre)
            logits = mx.concatenate([pre.logits for _, pre in taken]).astype(mx.float32)
            V = logits.shape[-1]
            bar = np.zeros(V, dtype=bool)
            bar[[t for t in self.stop if t < V]] = True
            self._steering()
            self._draw(logits, mx.where(mx.array(bar), float("-inf"), logits), start)
            self._keep()

    def _prefill(self, entries: list[Entry]) -> list[Prefilled]:
        """Each prompt's cache and last logits: those with a cached prefix compute only what
        follows it (together), the others run in one left-padded batch; all are cached after."""
        if self.prefix is None:
            return self._prefill_batch(entries)
        hits = [self.prefix.lookup(e.ids, e.plan) for e in entries]
        rest = [e for e, (P, _) in zip(entries, hits) if P == 0]
        out = dict(zip(map(id, rest), self._prefill_batch(rest) if rest else []))
        found = [(e, h) for e, h in zip(entries, hits) if h[0]]
        if found:
            after = self._prefill_after([e for e, _ in found], [h for _, h in found])
            out |= dict(zip((id(e) for e, _ in found), after))
        for e in entries:
            kv = [
                (c.keys[:, :, : c._idx - 1], c.values[:, :, : c._idx - 1]) for c in out[id(e)].cache
            ]
            nbytes = sum(k.nbytes + v.nbytes for k, v in kv)
            self.prefix.store(e.ids[:-1], e.plan, kv, nbytes)
        return [out[id(e)] for e in entries]

    def _prefill_after(self, entries: list[Entry], hits: list[tuple[int, list]]):
        """Prompts whose first tokens' keys and values are cached: each slot reads its own
        prefix (P_b tokens, left-padded to end at column P, the longest) and computes the rest,
        all in one forward, right-padded (a slot's padding comes after its last token, where
        nothing reads it). A prompt's prefill does not depend on the others beside it."""
        Ps, T = [h[0] for h in hits], [len(e.ids) for e in entries]
        n = [t - q for t, q in zip(T, Ps)]  # tokens each slot computes
        B, P, S = len(entries), max(Ps), max(n)
        ids = np.zeros((B, S), np.int32)
        valid = np.zeros((B, P + S), bool)
        on = np.zeros((B, S, 1), np.float32)
        for b, e in enumerate(entries):
            ids[b, : n[b]] = e.ids[Ps[b] :]
            valid[b, P - Ps[b] : P + n[b]] = True
            if e.plan is not None:
                on[b, : n[b], 0] = steer_mask(T[b], T[b], e.plan.positions)[Ps[b] :]
        cache = [KVCache() for _ in self.model.layers]
        for i, c in enumerate(cache):
            c.keys = _aligned([kv[i][0] for _, kv in hits], Ps)  # [B, kv_heads, P, head_dim]
            c.values = _aligned([kv[i][1] for _, kv in hits], Ps)
            c.offset = P
        kw = {}
        sp = SteerPlan.per_slot([e.plan for e in entries], self.hidden_size, self.dtype)
        if sp is not None:
            kw = {"steer": sp.vectors, "steer_on": mx.array(on).astype(self.dtype)}
        valid, window = mx.array(valid), self.window
        p = Pass(
            offset=mx.array(Ps), mask=attend_mask(valid, S),
            window_mask=attend_mask(valid, S, window) if window else None,
            head=mx.array([k - 1 for k in n]), **kw,
        )  # fmt: skip
        logits = self.model(mx.array(ids), cache, p)  # [B, 1, vocab]: each slot's last token
        mx.eval(logits, [c.state for c in cache])
        out = []
        for b, e in enumerate(entries):
            e.prefilled, first = n[b], P - Ps[b]
            own = []
            for c in cache:
                one = BatchKVCache([0])
                one.keys = c.keys[b : b + 1, :, first : P + n[b]]
                one.values = c.values[b : b + 1, :, first : P + n[b]]
                one._idx, one.offset = T[b], mx.array([T[b]])
                own.append(one)
            out.append(Prefilled(own, logits[b : b + 1, -1]))
        return out

    def _prefill_batch(self, entries: list[Entry]) -> list[Prefilled]:
        """These prompts in one left-padded batch, each with its own steering; each comes out
        with its own unpadded one-slot cache."""
        seqs, plans = [e.ids for e in entries], [e.plan for e in entries]
        batch = left_pad(seqs, 0)  # the pad id is never attended to
        kw = {}
        sp = SteerPlan.per_slot(plans, self.hidden_size, self.dtype)
        if sp is not None:
            kw = {"steer": sp.vectors, "steer_on": sp.prefill_on(batch)}
        pads = batch.pad.tolist()
        cache = [BatchKVCache(pads) for _ in self.model.layers]
        logits = prefill(self.model, batch, chunk=self.chunk, cache=cache, head="last", **kw)
        mx.eval(logits, [c.state for c in cache])
        for e in entries:
            e.prefilled = len(e.ids)
        return [
            Prefilled([_own_cache(c, b, p) for c in cache], logits[b : b + 1, -1])
            for b, p in enumerate(pads)
        ]

    def _append(self, e: Entry, pre: Prefilled) -> None:
        if self.cache is None:
            self.cache = [_empty() for _ in pre.cache]
        for mine, theirs in zip(self.cache, pre.cache, strict=True):
            mine.extend(theirs)  # new arrays: the prefill stays as it was for its siblings
        V, n = pre.logits.shape[-1], len(self.live)
        self.live.append(_Slot(e))
        s = e.sampling
        if s.repetition_penalty != 1.0 or self.seen is not None:
            mark = np.zeros((1, V), dtype=bool)
            if s.repetition_penalty != 1.0:
                mark[0, e.ids] = True
            old = self.seen if self.seen is not None else mx.zeros((n, V), dtype=mx.bool_)
            self.seen = mx.concatenate([old, mx.array(mark)])
        if s.logit_bias or self.bias is not None:
            add = np.zeros((1, V), dtype=np.float32)
            for t, v in e.bias().items():
                if 0 <= t < V:
                    add[0, t] = v
            old = self.bias if self.bias is not None else mx.zeros((n, V))
            self.bias = mx.concatenate([old, mx.array(add)])

    def _steering(self) -> None:
        """Each steered slot's vector [slots, 1, hidden] and where it acts ([slots, 1, 1])."""
        plans = [r.entry.plan for r in self.live]
        sp = SteerPlan.per_slot(plans, self.hidden_size, self.dtype)
        self.steer = {}
        if sp is not None:
            on = np.array([p is not None and p.positions != "prompt" for p in plans], np.float32)
            self.steer = {"steer": sp.vectors, "steer_on": mx.array(on[:, None, None])}
            self.steer["steer_on"] = self.steer["steer_on"].astype(self.dtype)

    # ---------------------------------------------------------------- decoding
    def _decode(self) -> None:
        """One step: every slot feeds its token; captured tokens are reported with their
        states; then each slot still going draws its next token."""
        tokens = mx.array([r.token for r in self.live])
        c = self.cache[0]
        S = c._idx + 1  # keys once this step's are written
        valid = mx.arange(S)[None] >= c.left_padding[:, None]  # [slots, S]
        grab = Grab(self.capture) if self.capture else None
        p = step_pass(valid, c.offset, self.window, head="last", observe=grab, **self.steer)
        logits = self.model(tokens[:, None], self.cache, p)[:, -1].astype(mx.float32)
        if any(r.pending for r in self.live):
            hidden = np.array(grab.stacked())  # [slots, R, hidden]
            for j, r in enumerate(self.live):
                if r.pending:
                    self._report(r, *r.pending, hidden[j])
                    if r.draining:
                        self._end(r)
        self._draw(logits, logits, 0)
        self._keep()

    def _draw(self, raw: mx.array, logits: mx.array, start: int) -> None:
        """Slots start.. (those not done) draw from logits [n, vocab] (raw: the model's own,
        for logprobs) and take their tokens."""
        idx = [j for j in range(start, len(self.live)) if not self.live[j].done]
        if not idx:
            return
        at = mx.array(idx)
        local = mx.array([j - start for j in idx])
        raw, logits = raw[local], logits[local]
        es = [self.live[j].entry for j in idx]
        if self.bias is not None:
            logits = logits + self.bias[at]
        if self.seen is not None:
            pen = np.array([e.sampling.repetition_penalty for e in es], np.float32)
            logits = penalize(logits, self.seen[at], mx.array(pen)[:, None])
        u = np.array([_u(e) for e in es])
        tokens = choose(logits, [e.sampling for e in es], u)
        if self.seen is not None:
            hit = np.zeros(self.seen.shape, dtype=bool)
            hit[idx, np.array(tokens)] = True
            self.seen = self.seen | mx.array(hit)
        lps = _logprobs(raw, tokens, [e.logprobs for e in es])
        for k, (j, t) in enumerate(zip(idx, tokens.tolist())):
            self._take(self.live[j], t, None if lps is None else lps[k])

    def _take(self, r: _Slot, token: int, lp) -> None:
        """Slot r drew `token`: a stop or the last allowed token ends its answer."""
        e = r.entry
        if token in self.stop:
            return self._end(r)
        e.answer.append(token)
        r.token = token
        last = len(e.answer) >= e.max_new_tokens
        if e.hidden and self.capture:
            r.pending, r.draining = (len(e.answer) - 1, token, lp), last
            return
        self._report(r, len(e.answer) - 1, token, lp, None)
        if last:
            self._end(r)

    def _report(self, r: _Slot, index: int, token: int, lp, hidden) -> None:
        r.pending = None
        e = r.entry
        if e.on_step is None or r.done:
            return
        step = TokenStep(e.prompt, index, token, hidden)
        if lp is not None:
            step.logprob, step.top = lp
        if e.on_step(step) is False:
            self._end(r)

    def _end(self, r: _Slot) -> None:
        if not r.done:
            r.done = True
            r.entry.on_end(r.entry)

    def _keep(self) -> None:
        """Drop the slots whose answers ended."""
        keep = [j for j, r in enumerate(self.live) if not r.done]
        if len(keep) == len(self.live):
            return
        self.live = [self.live[j] for j in keep]
        if not keep:
            self.cache = self.seen = self.bias = None
            self.steer = {}
            return
        at = mx.array(keep)
        for c in self.cache:
            c.filter(at)
        if self.seen is not None:
            self.seen = self.seen[at]
        if self.bias is not None:
            self.bias = self.bias[at]
        self._steering()


def _u(e: Entry) -> float:
    k = len(e.answer)  # the entry's next draw
    return float(e.uniforms[k]) if e.uniforms is not None and k < len(e.uniforms) else 0.5


def _logprobs(raw: mx.array, tokens: mx.array, wants: list[int | None]):
    """Per slot (logprob of its token, [(id, logprob)] best first or None), or None for all,
    under the model's own distribution."""
    if all(k is None for k in wants):
        return None
    lp = raw - mx.logsumexp(raw, axis=-1, keepdims=True)  # [n, vocab]
    chosen = np.array(mx.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]).tolist()
    k = max((w for w in wants if w), default=0)
    out = []
    if k:
        top = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k]  # [n, k], unordered
        ids, vals = np.array(top), np.array(mx.take_along_axis(lp, top, axis=-1))
        order = np.argsort(-vals, axis=-1, kind="stable")
        ids, vals = np.take_along_axis(ids, order, -1), np.take_along_axis(vals, order, -1)
    for j, w in enumerate(wants):
        if w is None:
            out.append(None)
        else:
            pairs = list(zip(ids[j][:w].tolist(), vals[j][:w].tolist())) if w else None
            out.append((chosen[j], pairs))
    return out


def _own_cache(c: BatchKVCache, b: int, pad: int) -> BatchKVCache:
    """Slot b of a prefilled cache as a one-slot cache of its own, without its padding."""
    one = BatchKVCache([0])
    one.keys, one.values = c.keys[b : b + 1, :, pad : c._idx], c.values[b : b + 1, :, pad : c._idx]
    one._idx = c._idx - pad
    one.offset = mx.array([one._idx])
    return one


def _aligned(prefixes: list[mx.array], lengths: list[int]) -> mx.array:
    """Each slot's first `lengths[b]` cached positions, left-padded with zeros to the longest:
    [B, kv_heads, max(lengths), head_dim] from [1, kv_heads, >= lengths[b], head_dim] each."""
    P = max(lengths)
    slots = []
    for x, q in zip(prefixes, lengths):
        x = x[:, :, :q]
        if q < P:
            x = mx.concatenate([mx.zeros((*x.shape[:2], P - q, x.shape[3]), x.dtype), x], axis=2)
        slots.append(x)
    return mx.concatenate(slots)


def _empty() -> BatchKVCache:
    """A cache of no slots that `extend` can grow (integer padding and offsets)."""
    c = BatchKVCache([0])
    c.left_padding = c.left_padding[:0]
    c.offset = c.offset[:0]
    return c
