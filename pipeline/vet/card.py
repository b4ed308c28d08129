"""The report card's data: a row's measures (RowCard), the whole card (VetReport), its files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RowCard:
    row: int
    v_norm: float
    h_norm: float
    coef: dict[str, float | None]  # ratio ("0.25", "0.5", "1") -> coefficient
    auroc: float
    cohens_d: float
    cos_next: float | None  # cosine with row + 1
    massive: list[tuple[int, float]]  # (dim, share of |h|^2) when a few dims dominate
    gain: dict[str, float] | None = None  # ratio -> causal gain (nats/token), causal.py
    cost: dict[str, float] | None = None  # ratio -> cost on the model's own answers
    trait_cost: dict[str, float] | None = None  # ratio -> cost on the held-out trait answers
    distinct: dict[str, float] | None = None  # ratio -> distinct trigram share, loop check


@dataclass
class VetReport:
    vector: str
    model: str
    trait: str
    kind: str
    method: str
    pairs: int
    split: dict  # held-out and training questions, pair counts, holdout, seed
    rows: list[RowCard]
    middle_rows: list[int]
    suggested_row: int | None
    warnings: list[str]
    other_vectors: dict[str, list[float | None]] = field(default_factory=dict)  # cos per row
    files: dict[str, str] = field(default_factory=dict)
    suggested_ratio: str | None = None  # "0.25" / "0.5" / "1" when the causal measure ran
    suggested_coef: float | None = None
    causal: dict | None = None  # pairs, questions, tokens, max_cost, within_cost, loop check
    judged: list[dict] = field(default_factory=list)  # vet --judged: per setting, judged means

    def row(self, r: int) -> RowCard:
        return self.rows[r]


def report_paths(out_dir: str | Path, trait: str) -> dict[str, Path]:
    """{json, md, png}: out_dir/{trait}_report.{ext}."""
    return {ext: Path(out_dir) / f"{trait}_report.{ext}" for ext in ("json", "md", "png")}


def load_report(path: str | Path) -> VetReport:
    """A report written by vet_vector, from its JSON file."""
    data = json.loads(Path(path).read_text())
    rows = [RowCard(**{**r, "massive": [tuple(m) for m in r["massive"]]}) for r in data["rows"]]
    return VetReport(**{**data, "rows": rows})
