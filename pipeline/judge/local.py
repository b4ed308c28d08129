"""The local judge: a pertoken backend's next-token distribution over the numbers 0..100.

The rubric is rendered with `backend.chat_prompt(None, rubric)`. When every "0".."100" is one
token, p(k) is read off one forward pass. Tokenizers that split numbers into digits (Gemma,
Qwen) need the digits one at a time: p(d), then p(e | d) for the likely d, then p(end | "10"),
which costs 1 + (likely first digits) + 1 forward passes per judged answer.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pertoken.errors import PertokenError
from pertoken.pipeline.judge.scoring import aggregate_score

DIGITS = [str(d) for d in range(10)]
EPS = 1e-4  # a prefix less likely than this is scored as complete (error <= EPS per prefix)


class LocalJudge:
    def __init__(self, backend, *, batch_size: int = 8):
        self.backend, self.batch_size = backend, batch_size
        self.requests = 0
        self.whole = _single_token_ids(backend, [str(k) for k in range(101)])
        self.digits = None if self.whole else _single_token_ids(backend, DIGITS)
        if self.whole is None and self.digits is None:
            raise PertokenError(
                f"{backend.model_id} has no single tokens for the digits 0-9: it cannot judge "
                "locally; use an API judge or another --judge local:MODEL"
            )

    def run(
        self,
        items: list[tuple[str, str]],
        on_done: Callable[[str, float | None], None],
        on_fail: Callable[[str, str], None],
        on_retry=None,  # nothing here is retried
    ) -> None:
        """Score each (key, judge prompt), a batch at a time, reporting as each batch ends.

        A NaN distribution (a broken model or dtype) is a failure, never a score."""
        for b in range(0, len(items), self.batch_size):
            chunk = items[b : b + self.batch_size]
            prompts = [self.backend.chat_prompt(None, text) for _, text in chunk]
            self.requests += len(chunk)
            for (key, _), probs in zip(chunk, self.number_probs(prompts)):
                try:
                    score = aggregate_score(probs)
                except ValueError as e:
                    on_fail(key, f"{e} (local judge {self.backend.model_id})")
                    continue
                on_done(key, score)

    def number_probs(self, prompts: list[str]) -> list[dict[int, float]]:
        """{k: p(k)} for k in 0..100 after each prompt."""
        if self.whole:
            p = np.exp(self._logprobs(prompts))  # [N, vocab]
            return [{k: float(row[i]) for k, i in enumerate(self.whole)} for row in p]
        q = np.zeros((len(prompts), 11, 10))  # digit probabilities after "", "1".."9", "10"
        q[:, 0] = self._digit_probs(prompts)
        # a longer prefix only where it can move the score: p(prefix) > EPS
        self._extend(
            q,
            prompts,
            [(n, d) for n in range(len(prompts)) for d in range(1, 10) if q[n, 0, d] > EPS],
        )
        self._extend(
            q, prompts, [(n, 10) for n in range(len(prompts)) if q[n, 0, 1] * q[n, 1, 0] > EPS]
        )
        return [_digit_numbers(x) for x in q]

    def _extend(self, q: np.ndarray, prompts: list[str], wanted: list[tuple[int, int]]) -> None:
        if wanted:
            probs = self._digit_probs([prompts[n] + str(d) for n, d in wanted])
            for (n, d), p in zip(wanted, probs):
                q[n, d] = p

    def _digit_probs(self, prompts: list[str]) -> np.ndarray:
        return np.exp(self._logprobs(prompts))[:, self.digits]  # [N, 10]

    def _logprobs(self, prompts: list[str]) -> np.ndarray:
        lp = self.backend.next_token_logprobs(prompts, batch_size=self.batch_size)
        return np.asarray(lp, dtype=np.float64)


def _single_token_ids(backend, texts: list[str]) -> list[int] | None:
    """One id per text, or None; a token that decodes to other text (an unknown-word id
    shared by every number) does not count."""
    ids = [backend.encode(t) for t in texts]
    if not all(len(i) == 1 for i in ids):
        return None
    flat = [i[0] for i in ids]
    exact = all(backend.decode([i]).strip() == t for i, t in zip(flat, texts))
    return flat if exact and len(set(flat)) == len(flat) else None


def _digit_numbers(q: np.ndarray) -> dict[int, float]:
    """q [11, 10]: digit probabilities after "", "1".."9" and "10"."""
    first, probs = q[0], {0: float(q[0][0])}
    for d in range(1, 10):
        second = q[d]  # p(e | d)
        probs[d] = float(first[d] * max(0.0, 1.0 - second.sum()))
        for e in range(10):
            probs[10 * d + e] = float(first[d] * second[e])
    after_10 = q[10]
    p10 = probs[10]
    probs[10] = p10 * max(0.0, 1.0 - after_10.sum())
    probs[100] = p10 * float(after_10[0])
    return probs
