"""What steering did to a traced item: the projection before each intervention, and which
conditional terms fired.

`proj.{vector}.L{row}` holds the projection after the interventions at that row (what later
layers read). Where a term acts at a traced row, `pre.{vector}.L{row}` holds it before: the
state at row r depends only on terms at rows below r, so it is the same forward with those
terms alone. A conditional Steer is decided once per item (backends.conditions.decide), and
its items are traced in groups that share the decision.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pertoken.backends.conditions import decide, decide_one
from pertoken.backends.steer import Steer


def pre_rows(steer: Steer | None, rows: list[int]) -> list[int]:
    """Traced rows where a term of `steer` acts."""
    acting = {t.row for t in steer.terms} if steer is not None else set()
    return [r for r in rows if r in acting]


def pre_columns(vectors: list[str], steer: Steer | None, rows: list[int]) -> list[str]:
    return [f"pre.{v}.L{r}" for v in vectors for r in pre_rows(steer, rows)]


def fired_columns(steer: Steer | None) -> list[str]:
    """One bool column per conditional term: `fired.{op}.{vector}.L{row}`."""
    terms = steer.terms if steer is not None else []
    return [f"fired.{t.op}.{t.name}.L{t.row}" for t in terms if t.when is not None]


@dataclass
class Projected:
    """Per item: token_projections' [T, R, V + 1], pre columns -> [T], fired columns -> bool."""

    values: np.ndarray
    pre: dict[str, np.ndarray]
    fired: dict[str, bool]


@dataclass(frozen=True)
class Directions:
    """Named vectors as unit directions at the traced layer rows."""

    names: list[str]
    units: np.ndarray  # [V, len(rows), hidden]
    rows: list[int]


def project(backend, ids, prompt_lens, dirs: Directions, steer, batch_size) -> list[Projected]:
    """Teacher-forced projections of `ids` under `steer`, with pre columns and decisions."""
    plans = [steer] * len(ids)
    if steer is not None and steer.conditional:
        plans = decide(backend, [s[:n] for s, n in zip(ids, prompt_lens)], plans)
    groups: dict[tuple, list[int]] = {}
    for i, plan in enumerate(plans):
        key = tuple(d["fired"] for d in plan.decisions) if plan is not None else ()
        groups.setdefault(key, []).append(i)
    out: list[Projected | None] = [None] * len(ids)
    for idx in groups.values():
        plan = plans[idx[0]]
        part = [ids[i] for i in idx]
        lens = [prompt_lens[i] for i in idx]
        kw = dict(prompt_lens=lens, batch_size=batch_size)
        values = backend.token_projections(part, dirs.units, dirs.rows, steer=plan, **kw)
        pre = _pre(backend, part, dirs, plan, steer, kw)
        decisions = plan.decisions if plan is not None else []
        fired = dict(zip(fired_columns(steer), (d["fired"] for d in decisions)))
        for j, i in enumerate(idx):
            out[i] = Projected(values[j], {c: v[j] for c, v in pre.items()}, fired)
    return out


def _pre(backend, ids, d: Directions, plan, steer, kw) -> dict[str, list[np.ndarray]]:
    """pre column -> per sequence [T]: row r traced with only the terms below r."""
    out = {}
    for r in pre_rows(steer, d.rows):
        below = [t for t in (plan.terms if plan is not None else []) if t.row < r]
        j = d.rows.index(r)
        got = backend.token_projections(
            ids, d.units[:, j : j + 1], [r], steer=Steer(below, plan.positions) if below else None,
            **kw,
        )  # fmt: skip
        for k, v in enumerate(d.names):
            out[f"pre.{v}.L{r}"] = [g[:, 0, k] for g in got]
    return out


def term_record(t) -> dict:
    """What a settings record adds for a term beyond layer and coef: its operator, bounds and
    condition (nothing for a plain add, so records of adding stay as they were)."""
    out: dict = {}
    if t.op != "add":
        out["op"] = t.op
        out |= {k: getattr(t, k) for k in ("lo", "hi") if getattr(t, k) is not None}
        out |= {"mean": t.mean} if t.op == "ablate" else {}
    if t.when is not None:
        w = t.when
        sha = hashlib.sha256(np.asarray(w.vector, np.float32).tobytes()).hexdigest()
        out["when"] = {"layer": w.row, "threshold": w.threshold, "above": w.above, "sha256": sha}
    return out


def monitor_extras(backend, chat: str, trace, steer, names, directions, layers) -> dict:
    """A monitored answer's `pre` projections ("{vector}.L{row}" -> one per answer token, at
    the token's own position, read in a teacher-forced pass) and its `conditions`."""
    out = {"conditions": trace.meta["conditions"]} if trace.meta.get("conditions") else {}
    rows = pre_rows(steer, list(layers))
    if not rows or not trace.token_ids:
        return out
    prompt = backend.encode(chat)
    plan = decide_one(backend, prompt, steer)
    ids, P = prompt + list(trace.token_ids), len(prompt)
    pre = {}
    for r in rows:
        below = [t for t in plan.terms if t.row < r]
        j = list(layers).index(r)
        unit = directions[:, j : j + 1] / np.linalg.norm(
            directions[:, j : j + 1], axis=-1, keepdims=True
        )
        (got,) = backend.token_projections(
            [ids], unit.astype(np.float32), [r], prompt_lens=[P],
            steer=Steer(below, plan.positions) if below else None,
        )  # fmt: skip
        for k, v in enumerate(names):
            pre[f"{v}.L{r}"] = [float(x) for x in got[P : P + len(trace.token_ids), 0, k]]
    return out | {"pre": pre}
