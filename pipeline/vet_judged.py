"""`vet --judged N`: a small judged steering check of the card's top settings.

The N settings with the largest causal gain within the cost bound (then the others, by gain)
answer the held-out questions with no instruction, greedy, beside the unsteered answers, all in
one generate call; the judge scores trait and coherence."""

from __future__ import annotations

import numpy as np

from pertoken.backends.base import Steer
from pertoken.pipeline.csvio import parse_score


def top_settings(report, n: int) -> list[tuple[int, str]]:
    """The n best (row, ratio) by causal gain, those within the cost bound first."""
    bound = report.causal["max_cost"]
    cards = [(r.row, k, r.gain[k], r.cost[k]) for r in report.rows if r.gain for k in r.gain]
    cards.sort(key=lambda c: (c[3] > bound, -c[2]))
    return [(row, k) for row, k, _, _ in cards[:n]]


def judged_check(backend, report, vector, questions, judge, *, n: int, max_new_tokens=64):
    """[{row, ratio, coef, trait, coherence, n}] with the unsteered answers first (row None)."""
    settings = [(None, None)] + top_settings(report, n)
    grid = [(s, q) for s in settings for q in questions]
    steers = [
        None
        if row is None
        else Steer.single(row, vector[row], report.rows[row].coef[k], positions="response")
        for (row, k), _ in grid
    ]
    prompts = [backend.chat_prompt(None, q) for _, q in grid]
    answers = backend.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=0.0, steer=steers
    )
    rows = [
        {"question": q, "answer": a, report.trait: "", "coherence": ""}
        for (_, q), a in zip(grid, answers, strict=True)
    ]
    judge.judge_rows(rows)
    out = []
    for i, (row, k) in enumerate(settings):
        block = rows[i * len(questions) : (i + 1) * len(questions)]
        out.append(
            {
                "row": row,
                "ratio": k,
                "coef": 0.0 if row is None else report.rows[row].coef[k],
                "trait": _mean(block, report.trait),
                "coherence": _mean(block, "coherence"),
                "n": len(block),
            }
        )
    return out


def _mean(rows: list[dict], column: str) -> float | None:
    scores = [s for s in (parse_score(r[column]) for r in rows) if s is not None]
    return float(np.mean(scores)) if scores else None
