"""Conditional steering (`when`): each sequence's conditions decided once, after its prompt.

A term with a Condition acts on a sequence only when the mean projection of the sequence's
prompt tokens on the condition vector, at the condition's row, passes its threshold. The
projection is read in a teacher-forced pass over the prompt with the plan's other terms
applied, so the decision sees the prompt as the steered model does; the plan that comes back
holds only the terms that act, and records every decision in `Steer.decisions`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from pertoken.backends.steer import Condition, Steer


def decide(backend, prompts: list[list[int]], plans: list[Steer | None]) -> list[Steer | None]:
    """Per prompt (token ids), its plan with conditional terms kept or dropped."""
    out = list(plans)
    groups: dict[int, list[int]] = {}  # one pass per distinct conditional plan
    for i, plan in enumerate(plans):
        if plan is not None and plan.conditional:
            groups.setdefault(id(plan), []).append(i)
    for idx in groups.values():
        plan = plans[idx[0]]
        base = [t for t in plan.terms if t.when is None]
        means = _prompt_means(backend, [prompts[i] for i in idx], plan, base)
        for j, i in enumerate(idx):
            out[i] = _resolved(plan, base, {c: m[j] for c, m in means.items()})
    return out


def _prompt_means(backend, prompts, plan: Steer, base) -> dict[int, np.ndarray]:
    """id(condition) -> [len(prompts)] mean prompt projection on it."""
    steer = Steer(base, plan.positions) if base else None
    lens = [len(p) for p in prompts]
    means = {}
    for cond in {id(t.when): t.when for t in plan.terms if t.when is not None}.values():
        unit = cond.unit[None, None]  # [1, 1, hidden]
        got = backend.token_projections(
            prompts, unit, [cond.row], steer=steer, prompt_lens=lens, batch_size=8
        )
        means[id(cond)] = np.array([float(g[:, 0, 0].mean()) for g in got])
    return means


def _resolved(plan: Steer, base, means: dict[int, float]) -> Steer:
    terms, decisions = [], []
    for t in plan.terms:
        if t.when is None:
            terms.append(t)
            continue
        m = means[id(t.when)]
        fired = t.when.holds(m)
        decisions.append(_record(t.op, t.name, t.row, t.when, m, fired))
        if fired:
            terms.append(replace(t, when=None))
    return Steer(terms, plan.positions, decisions)


def _record(op: str, name: str, row: int, cond: Condition, mean: float, fired: bool) -> dict:
    return {
        "op": op,
        "vector": name,
        "layer": row,
        "when": cond.describe(),
        "projection": round(float(mean), 6),
        "fired": bool(fired),
    }


def grouped_by_decision(backend, ids, steer: Steer, prompt_lens) -> list[tuple[list[int], Steer]]:
    """Teacher-forced sequences under one conditional Steer, grouped by what it decided for
    each: (indices, the decided Steer) per group."""
    lens = prompt_lens or [len(s) for s in ids]
    decided = decide(backend, [s[:n] for s, n in zip(ids, lens)], [steer] * len(ids))
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(decided):
        groups.setdefault(tuple(d["fired"] for d in plan.decisions), []).append(i)
    return [(idx, decided[idx[0]]) for idx in groups.values()]


def conditional_projections(project, ids, directions, rows, steer, prompt_lens, batch_size):
    """`token_projections` for a conditional Steer: each group of sequences under the terms
    that act on it; `project` is the backend's own token_projections."""
    out: list[np.ndarray] = [np.zeros(0)] * len(ids)
    for idx, plan in grouped_by_decision(project.__self__, ids, steer, prompt_lens):
        lens = None if prompt_lens is None else [prompt_lens[i] for i in idx]
        got = project([ids[i] for i in idx], directions, rows, steer=plan,
                      prompt_lens=lens, batch_size=batch_size)  # fmt: skip
        for i, g in zip(idx, got):
            out[i] = g
    return out


def decide_one(backend, prompt: list[int], steer: Steer | None) -> Steer | None:
    """`decide` for one sequence whose first tokens `prompt` are its prompt."""
    if steer is None or not steer.conditional:
        return steer
    steer.validate(backend.n_layers, backend.hidden_size, backend.dtype)
    return decide(backend, [prompt], [steer])[0]


def trace_meta(steer: Steer | None) -> dict:
    """What a TokenTrace records of its conditions."""
    return {"conditions": steer.decisions} if steer is not None and steer.decisions else {}
