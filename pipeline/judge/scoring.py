"""The judge's score (docs/CONVENTIONS.md): the expected number under the judge's next-token
distribution, over tokens that are integers 0..100; missing when they carry < 0.25 of the mass."""

from __future__ import annotations

import math
import re

MIN_NUMBER_MASS = 0.25
_INT = re.compile(r"\s*[0-9]+\s*")


def number_probs(top_logprobs: list[tuple[str, float]]) -> dict[int, float]:
    """{k: p(k)} from (token, logprob) pairs, keeping tokens that read as an integer 0..100."""
    probs: dict[int, float] = {}
    for token, logprob in top_logprobs:
        if _INT.fullmatch(token) and 0 <= int(token) <= 100:
            k = int(token)
            probs[k] = probs.get(k, 0.0) + math.exp(logprob)
    return probs


def aggregate_score(probs: dict[int, float]) -> float | None:
    """sum(k * p(k)) / sum(p(k)), or None when sum(p(k)) < 0.25 (a refusal, say).

    Non-finite probabilities are a ValueError: a broken answer, not a refusal."""
    if not all(math.isfinite(p) for p in probs.values()):
        raise ValueError("the judge's probabilities are not finite numbers (NaN or inf)")
    total = sum(probs.values())
    if total < MIN_NUMBER_MASS:
        return None
    return sum(k * p for k, p in probs.items()) / total
