"""A small deterministic backend that meets the Backend protocol without weights.

Tokens are characters (id = code point), so encode(decode(ids)) == ids. Row r of position j is
a fixed mix of the token's embedding and the running mean of embeddings up to j (causal), and
steering at row L adds coef * vector to rows >= L, so it changes the greedy next token.
"""

from __future__ import annotations

import numpy as np

from pertoken.backends.base import (
    Steer,
    Summaries,
    TokenStep,
    check_projection_inputs,
    steer_mask,
)
from pertoken.backends.generation import SHORTHAND, SlotBackend

ALPHABET = " abcdefghijklmnopqrstuvwxyz.<>/"
EOS = 0


class FakeSlots:
    """The fake's slot loop: each step, every entry in a slot takes one token."""

    def __init__(self, backend, slots, rows, on_flush):
        self.b, self.slots, self.rows, self.on_flush = backend, slots, list(rows), on_flush
        self.waiting, self.live = [], []

    @property
    def busy(self):
        return bool(self.waiting or self.live)

    def insert(self, entry):
        self.waiting.append(entry)

    def step(self):
        while self.waiting and len(self.live) < self.slots:
            self.live.append(self.waiting.pop(0))
        for e in list(self.live):
            if e.cancelled or not self._advance(e):
                self.live.remove(e)
                e.on_end(e)
        if self.on_flush is not None:
            self.on_flush()

    def _advance(self, e) -> bool:
        """One token of e; False when its answer has ended."""
        tok = self.b.next_id(e, e.answer)
        if tok == EOS:
            return False
        e.answer.append(tok)
        if e.on_step is not None:
            h = self.b.hidden(e.ids + e.answer, steer=e.plan, prompt_len=len(e.ids))
            step = TokenStep(
                e.prompt, len(e.answer) - 1, tok, h[-1, self.rows] if e.hidden else None
            )
            if e.on_step(step) is False:
                return False
        return len(e.answer) < e.max_new_tokens


class FakeBackend(SlotBackend):
    name = "fake"
    model_type = "fake"
    dtype = "float32"
    device = "cpu"
    generation_config: dict = {}

    def __init__(
        self, model_id: str = "org/fake-chat-1b", n_layers: int = 4, hidden_size: int = 16
    ):
        self.model_id, self.n_layers, self.hidden_size = model_id, n_layers, hidden_size
        rng = np.random.default_rng(1234)
        self.embed = rng.normal(size=(0x250, hidden_size)).astype(np.float32)  # [vocab, hidden]
        self.out_ids = np.array([EOS] + [ord(c) for c in ALPHABET])
        self.unembed = rng.normal(size=(len(self.out_ids), hidden_size)).astype(np.float32)
        self.calls: list[dict] = []
        self.tracing = False

    @classmethod
    def load(cls, model, *, dtype=None, device=None):
        return cls(model)

    def chat_prompt(self, system, user):
        sys_part = f"<s>{system}</s>" if system else ""
        return f"{sys_part}<u>{user}</u><a>"

    def encode(self, text):
        return [min(ord(c), len(self.embed) - 1) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != EOS)

    def chat_text(self, messages, *, add_generation_prompt=False):
        tags = {"system": "s", "user": "u", "assistant": "a"}
        text = "".join(f"<{tags[m['role']]}>{m['content']}</{tags[m['role']]}>" for m in messages)
        return text + ("<a>" if add_generation_prompt else "")

    def encode_offsets(self, text):
        return self.encode(text), [(i, i + 1) for i in range(len(text))]

    def hidden(self, ids, *, steer: Steer | None = None, prompt_len: int | None = None):
        """[T, n_layers + 1, hidden] float32 for one sequence."""
        e = self.embed[np.asarray(ids)]  # [T, hidden]
        run = np.cumsum(e, axis=0) / np.arange(1, len(ids) + 1)[:, None]  # [T, hidden]
        rows = np.arange(self.n_layers + 1, dtype=np.float32)[None, :, None]
        h = e[:, None, :] * (1 + 0.1 * rows) + 0.5 * rows * run[:, None, :]  # [T, R, hidden]
        if steer is not None:
            mask = steer_mask(prompt_len or len(ids), len(ids), steer.positions)
            for row, add in steer.by_row().items():
                h[mask, row:] += add
        return h.astype(np.float32)

    def generate(self, prompts, **kw):
        sampling = self._sampling(kw.get("sampling"), {k: kw[k] for k in SHORTHAND if k in kw})
        if not self.tracing:
            self.calls.append(dict(kind="generate", steer=kw.get("steer"), seed=sampling.seed))
        return super().generate(prompts, **kw)

    def trace(self, prompt, **kw):
        self.calls.append(dict(kind="trace", steer=kw.get("steer"), seed=kw.get("seed", 0)))
        self.tracing = True  # the trace's own generate call is not recorded again
        try:
            return super().trace(prompt, **kw)
        finally:
            self.tracing = False

    def _slots(self, batch, rows, length, on_flush=None):
        return FakeSlots(self, batch, rows, on_flush)

    def next_id(self, e, out: list[int]) -> int:
        """The next token of entry e after `out`: greedy, or by inverse CDF at its draw."""
        h = self.hidden(e.ids + out, steer=e.plan, prompt_len=len(e.ids))
        logits = self.unembed @ h[-1, -1]  # [n_out]
        if not out:
            logits[self.out_ids == EOS] = -np.inf  # an answer has at least one token
        if e.uniforms is None:
            return int(self.out_ids[int(np.argmax(logits))])
        p = np.exp((logits - logits.max()) / e.sampling.temperature)
        cdf = np.cumsum(p / p.sum())
        return int(
            self.out_ids[
                min(int(np.searchsorted(cdf, e.uniforms[len(out)], "right")), len(cdf) - 1)
            ]
        )

    def summaries(self, prompts, answers, *, batch_size=8):
        pa, pl, ra = [], [], []
        for p, a in zip(prompts, answers, strict=True):
            n = len(self.encode(p))
            h = self.hidden(self.encode(p) + self.encode(a))
            pa.append(h[:n].mean(0))
            pl.append(h[n - 1])
            ra.append(h[n:].mean(0) if len(h) > n else np.zeros_like(h[0]))
        return Summaries(np.stack(pa), np.stack(pl), np.stack(ra))

    def logits(self, text, *, steer=None, prompt_len=None):
        h = self.hidden(self.encode(text), steer=steer, prompt_len=prompt_len)
        return (h[:, -1] @ self.unembed.T).astype(np.float32)

    def next_token_logprobs(self, prompts, *, batch_size=8):
        raise NotImplementedError

    def token_projections(
        self, ids, directions, rows, *, steer=None, prompt_lens=None, batch_size=16
    ):
        self.calls.append(dict(kind="token_projections", n=len(ids), steer=steer))
        d = check_projection_inputs(ids, directions, rows, self.n_layers, self.hidden_size)
        plens = prompt_lens if prompt_lens is not None else [len(s) for s in ids]
        out = []
        for seq, p in zip(ids, plens, strict=True):
            h = self.hidden(seq, steer=steer, prompt_len=p)[:, list(rows)]  # [T, R, hidden]
            proj = np.einsum("trh,vrh->trv", h, d)  # [T, R, V]
            norm = np.linalg.norm(h, axis=-1, keepdims=True)  # [T, R, 1]
            out.append(np.concatenate([proj, norm], axis=-1).astype(np.float32))
        return out
