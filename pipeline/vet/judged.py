"""`vet --judged N`: a small judged steering check of the card's top rows x coefficients.

The causal measures are proxies on a few held-out answers. So the N rows with the largest
causal gain among their sound settings (causal.sound; without any, within the trait-cost
bound), at each of the card's coefficients, answer at least MIN_ANSWERS questions with no
instruction (greedy; causal.check_questions), beside the unsteered
answers, all in one generate call; the judge scores trait and coherence, and the suggestion
becomes the highest judged trait whose judged coherence is at least MIN_COHERENCE."""

from __future__ import annotations

import numpy as np

from pertoken.backends.base import Steer
from pertoken.pipeline.csvio import parse_score
from pertoken.pipeline.vet.causal import MAX_COST

MIN_COHERENCE = 60.0  # judged coherence the suggested setting must keep


def top_settings(report, n: int) -> list[tuple[int, str]]:
    """The n rows of best causal gain among their sound settings, at each coefficient."""
    c = report.causal or {}
    max_cost = c.get("max_cost", MAX_COST)

    def best(r, strict: bool) -> float:
        ok = [k for k in r.gain if _ok(r, k, max_cost, c.get("min_distinct") if strict else None)]
        return max((r.gain[k] for k in ok), default=-np.inf)

    rows = [r for r in report.rows if r.gain]
    rows = sorted(rows, key=lambda r: (best(r, True), best(r, False)), reverse=True)[:n]
    return [(r.row, k) for r in rows for k in r.gain]


def _ok(r, k: str, max_cost: float, min_distinct: float | None) -> bool:
    cost = r.trait_cost if r.trait_cost is not None else r.cost
    if r.gain[k] <= 0 or cost[k] > max_cost:
        return False
    return min_distinct is None or (r.distinct or {}).get(k, 0.0) >= min_distinct


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
