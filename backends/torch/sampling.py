"""Choosing next tokens from float32 logits as transformers' `generate` does, each slot with
its own settings: logit bias, repetition penalty, then temperature, top-k and top-p, then a
draw by inverse CDF at the slot's own uniform (argmax for greedy slots)."""

from __future__ import annotations

import torch

from pertoken.backends.generation import Entry


class SlotSampler:
    """Each slot's sampling settings, seen tokens and draws, on the device."""

    def __init__(self, B: int, length: int, home: torch.device):
        wide = torch.float32 if home.type == "mps" else torch.float64  # no f64 on MPS
        self.home, self.B = home, B
        self.temp = torch.ones(B, device=home)
        self.top_k = torch.zeros(B, dtype=torch.long, device=home)
        self.top_p = torch.ones(B, device=home)
        self.penalty = torch.ones(B, device=home)
        self.greedy = torch.ones(B, dtype=torch.bool, device=home)
        self.u = torch.full((B, length), 0.5, dtype=wide, device=home)  # each slot's draws
        self.count = torch.zeros(B, dtype=torch.long, device=home)
        self.seen: torch.Tensor | None = None  # [B, vocab] bool, once a slot has a penalty
        self.bias: torch.Tensor | None = None  # [B, vocab] float32, once a slot has a bias
        self.entries: list[Entry | None] = [None] * B

    FIELDS = ("temp", "top_k", "top_p", "penalty", "greedy", "count", "u", "seen", "bias")

    def resize(self, B: int, length: int) -> None:
        """Settings and draws for B slots of `length` draws, the first slots kept."""
        at = slice(0, min(B, self.B))
        for name in self.FIELDS:
            old = getattr(self, name)
            if old is None:
                continue
            fill = {"u": 0.5, "temp": 1, "top_p": 1, "penalty": 1, "greedy": True}.get(name, 0)
            shape = (B, length) if name == "u" else (B, *old.shape[1:])
            new = torch.full(shape, fill, dtype=old.dtype, device=self.home)
            lines = old[at]
            if old.ndim == 2:
                new[: len(lines), : old.shape[1]] = lines
            else:
                new[: len(lines)] = lines
            setattr(self, name, new)
        entries = self.entries[at]
        self.entries = entries + [None] * (B - len(entries))
        self.B = B

    def move(self, src: int, dst: int) -> None:
        """Slot src's settings, seen tokens and draws into slot dst."""
        for name in self.FIELDS:
            buf = getattr(self, name)
            if buf is not None:
                buf[dst] = buf[src]
        self.entries[dst], self.entries[src] = self.entries[src], None

    def load(self, b: int, e: Entry, vocab: int) -> None:
        s, self.entries[b] = e.sampling, e
        self.greedy[b], self.temp[b] = s.greedy, 1.0 if s.greedy else s.temperature
        self.top_k[b], self.top_p[b], self.penalty[b] = s.top_k, s.top_p, s.repetition_penalty
        self.count[b] = 0
        if e.uniforms is not None:
            n = min(len(e.uniforms), self.u.shape[1])
            self.u[b, :n] = torch.from_numpy(e.uniforms[:n]).to(self.u)
        if s.repetition_penalty != 1.0:
            if self.seen is None:
                self.seen = torch.zeros(self.B, vocab, dtype=torch.bool, device=self.home)
            self.seen[b] = False
            self.seen[b, torch.tensor(e.ids, device=self.home)] = True
        if e.sampling.logit_bias or self.bias is not None:
            if self.bias is None:
                self.bias = torch.zeros(self.B, vocab, device=self.home)
            self.bias[b] = 0.0
            for t, v in e.bias().items():
                if 0 <= t < vocab:
                    self.bias[b, t] = v

    def free(self, b: int) -> None:
        self.entries[b] = None

    def __call__(self, logits: torch.Tensor, at: torch.Tensor, live: list[int]) -> torch.Tensor:
        """Tokens [n] from logits [n, vocab] of slots `at` [n] (`live`: the same, on the host)."""
        es = [self.entries[b] for b in live]
        if self.bias is not None and any(e.sampling.logit_bias for e in es):
            logits = logits + self.bias[at]
        if self.seen is not None and any(e.sampling.repetition_penalty != 1.0 for e in es):
            logits = penalize(logits, self.seen[at], self.penalty[at, None])
        if all(e.sampling.greedy for e in es):
            tokens = logits.argmax(-1)
        else:
            tokens = self._sample(logits, at, es)
        if self.seen is not None:
            self.seen[at, tokens] = True
        self.count[at] += 1
        return tokens

    def _sample(self, logits: torch.Tensor, at: torch.Tensor, es: list[Entry]) -> torch.Tensor:
        scaled = logits / self.temp[at, None]
        if any(e.sampling.top_k > 0 for e in es):
            scaled = top_k(scaled, self.top_k[at])
        if any(e.sampling.top_p < 1.0 for e in es):
            scaled = top_p(scaled, self.top_p[at])
        last = self.u.shape[1] - 1
        u = self.u[at, self.count[at].clamp(max=last)]  # [n]
        drawn = draw(torch.softmax(scaled, -1), u)
        return torch.where(self.greedy[at], logits.argmax(-1), drawn)


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    penalty, or multiplied when negative (penalty [n, 1], one per slot)."""
    hit = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, hit, logits)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[n, vocab] probabilities -> [n] picks by inverse CDF at u [n]."""
    cdf = probs.to(u.dtype).cumsum(-1)  # [n, vocab], float64 where the device has it
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)  # first cdf > target
    return pick.clamp(max=probs.shape[-1] - 1)[:, 0]


def top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep each slot's k most likely tokens (and any tied with the k-th), as
    TopKLogitsWarper; k [n], 0 keeps every token."""
    V = logits.shape[-1]
    ranked = logits.sort(-1, descending=True).values  # [n, vocab]
    kth = ranked.gather(-1, (k.clamp(1, V) - 1)[:, None])  # [n, 1]
    kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Drop each slot's least likely tokens whose total probability is at most 1 - p (the most
    likely token always stays), as transformers' TopPLogitsWarper; p [n]."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # [n, vocab], ascending
    drop = (cum <= (1 - p)[:, None]) & (p[:, None] < 1)
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
