"""`vet --judged N`: a small judged steering check of the card's top rows x coefficients.

Teacher forcing cannot see a model that loops ("la la la") on fluent-looking tokens, and for a
trait that changes the whole answer (a language) the cost on the model's own answers moves with
the gain. So the N rows with the largest causal gain at a cost of at most WIDE_COST, at each of
the card's coefficients, answer the held-out questions with no instruction (greedy), beside the
unsteered answers, all in one generate call; the judge scores trait and coherence, and the
suggestion becomes the highest judged trait whose judged coherence is at least MIN_COHERENCE."""

from __future__ import annotations

import numpy as np

from pertoken.backends.base import Steer
from pertoken.pipeline.csvio import parse_score

WIDE_COST = 3.0  # nats per token: rows are ranked by their best gain up to this cost
MIN_COHERENCE = 60.0  # judged coherence the suggested setting must keep


def top_settings(report, n: int) -> list[tuple[int, str]]:
    """The n rows with the best causal gain at cost <= WIDE_COST, at each coefficient."""

    def best(r) -> float:
        gains = [g for k, g in r.gain.items() if r.cost[k] <= WIDE_COST]
        return max(gains, default=-np.inf)

    rows = sorted((r for r in report.rows if r.gain), key=best, reverse=True)[:n]
    return [(r.row, k) for r in rows for k in r.gain]


def judged_pick(judged: list[dict]) -> dict | None:
    """The steered setting with the highest judged trait at coherence >= MIN_COHERENCE."""
    ok = [j for j in judged if j["row"] is not None and (j["coherence"] or 0) >= MIN_COHERENCE]
    ok = [j for j in ok if j["trait"] is not None]
    return max(ok, key=lambda j: (j["trait"], j["coherence"])) if ok else None


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
