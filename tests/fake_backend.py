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
    TokenTrace,
    check_projection_inputs,
    steer_mask,
)

ALPHABET = " abcdefghijklmnopqrstuvwxyz.<>/"
EOS = 0


class FakeBackend:
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

    def _next(self, h_last, rng, temperature):
        logits = self.unembed @ h_last  # [n_out]
        if temperature == 0:
            return int(self.out_ids[int(np.argmax(logits))])
        p = np.exp((logits - logits.max()) / temperature)
        return int(rng.choice(self.out_ids, p=p / p.sum()))

    def _generate_ids(self, prompt, max_new_tokens, temperature, seed, steer):
        ids, rng = self.encode(prompt), np.random.default_rng(seed)
        n_prompt, out = len(ids), []
        for _ in range(max_new_tokens):
            h = self.hidden(ids + out, steer=steer, prompt_len=n_prompt)
            tok = self._next(h[-1, -1], rng, temperature)
            if tok == EOS:
                break
            out.append(tok)
        return out

    def generate(
        self,
        prompts,
        *,
        max_new_tokens=1000,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        seed=0,
        steer=None,
        batch_size=None,
        seeds=None,
        schedule="continuous",
        on_answer=None,
    ):
        self.calls.append(dict(kind="generate", steer=steer, seed=seed))
        seeds = seeds if seeds is not None else [seed] * len(prompts)
        answers = []
        for k, (p, s) in enumerate(zip(prompts, seeds, strict=True)):
            answers.append(
                self.decode(self._generate_ids(p, max_new_tokens, temperature, s, steer))
            )
            if on_answer is not None:
                on_answer(k, answers[-1])
        return answers

    def summaries(self, prompts, answers, *, batch_size=8):
        pa, pl, ra = [], [], []
        for p, a in zip(prompts, answers, strict=True):
            n = len(self.encode(p))
            h = self.hidden(self.encode(p) + self.encode(a))
            pa.append(h[:n].mean(0))
            pl.append(h[n - 1])
            ra.append(h[n:].mean(0) if len(h) > n else np.zeros_like(h[0]))
        return Summaries(np.stack(pa), np.stack(pl), np.stack(ra))

    def trace(
        self,
        prompt,
        *,
        max_new_tokens=200,
        rows,
        steer=None,
        temperature=0.0,
        seed=0,
        on_token=None,
    ):
        self.calls.append(dict(kind="trace", steer=steer, seed=seed))
        out = self._generate_ids(prompt, max_new_tokens, temperature, seed, steer)
        p_ids = self.encode(prompt)
        h = self.hidden(p_ids + out, steer=steer, prompt_len=len(p_ids))[len(p_ids) :][:, rows]
        pieces = [chr(i) for i in out]
        for i, piece in enumerate(pieces):
            if on_token:
                on_token(i, piece, h[i])
        return TokenTrace(prompt, self.decode(out), pieces, out, list(rows), h)

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
