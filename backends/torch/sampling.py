"""Choosing next tokens from float32 logits as transformers' `generate` does: repetition
penalty, then temperature, top-k and top-p, then a draw (argmax at temperature 0)."""

from __future__ import annotations

import torch

from pertoken.backends.base import Sampling, is_greedy


class Sampler:
    """Samples one token per row; remembers the tokens each row has seen for the penalty."""

    def __init__(self, s: Sampling, stop_ids: torch.Tensor, gen=None):
        self.s, self.stop_ids, self.gen = s, stop_ids, gen
        self.seen: torch.Tensor | None = None  # [B, vocab] bool, only with a penalty

    def start(self, ids: torch.Tensor, attn: torch.Tensor, vocab: int) -> None:
        """The prompt tokens (ids, attn [B, T]) count as seen, padding does not."""
        self.stop_ids = self.stop_ids[self.stop_ids < vocab]
        if self.s.repetition_penalty != 1.0:
            hits = torch.zeros(ids.shape[0], vocab, device=ids.device)
            self.seen = hits.scatter_add_(1, ids, attn.float()) > 0

    def __call__(self, logits: torch.Tensor, first: bool = False, u=None) -> torch.Tensor:
        """logits [B, vocab] float32 -> tokens [B]; on the first step stop tokens are barred.

        u [B] (per-row seeds): each row draws by inverse CDF at its own u, else from `gen`."""
        if first:  # an answer has at least one token, as upstream's generation forces
            logits = logits.index_fill(-1, self.stop_ids, float("-inf"))
        if self.seen is not None:
            logits = penalize(logits, self.seen, self.s.repetition_penalty)
        tok = choose(logits, self.s, self.gen, u)
        if self.seen is not None:
            self.seen.scatter_(1, tok[:, None], True)
        return tok


def penalize(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is divided by the
    penalty, or multiplied when negative."""
    hit = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, hit, logits)


def choose(logits: torch.Tensor, s: Sampling, gen=None, u=None) -> torch.Tensor:
    """logits [B, vocab] float32 -> token ids [B]; u [B] as in Sampler."""
    if is_greedy(s.temperature):
        return logits.argmax(-1)
    logits = logits / s.temperature
    if s.top_k > 0:
        logits = top_k(logits, s.top_k)
    if s.top_p < 1.0:
        logits = top_p(logits, s.top_p)
    return draw(torch.softmax(logits, -1), gen, u).squeeze(-1)


def draw(probs: torch.Tensor, gen, u) -> torch.Tensor:
    """[B, vocab] probabilities -> [B, 1] picks: from `gen`, or by inverse CDF at u [B]."""
    if u is None:
        return torch.multinomial(probs, 1, generator=gen)
    cdf = probs.to(u.dtype).cumsum(-1)  # [B, vocab], float64 where the device has it
    pick = torch.searchsorted(cdf, u[:, None] * cdf[:, -1:], right=True)  # first cdf > target
    return pick.clamp(max=probs.shape[-1] - 1)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most likely tokens (and any tied with the k-th), as TopKLogitsWarper."""
    kth = torch.topk(logits, min(k, logits.shape[-1])).values[..., -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Drop the least likely tokens whose total probability is at most 1 - p (the most
    likely token always stays), as transformers' TopPLogitsWarper."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)  # [B, vocab], ascending
    drop = cum <= 1 - p
    drop[..., -1] = False
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
