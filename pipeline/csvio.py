"""Generation CSVs (CONVENTIONS): columns, row keys, atomic writes."""

from __future__ import annotations

import csv
from pathlib import Path

from pertoken.atomic import atomic_writer
from pertoken.errors import PertokenError

BASE_COLUMNS = ("question", "prompt", "answer", "question_id")


def columns(trait: str) -> list[str]:
    """`question, prompt, answer, question_id, {trait}, coherence, sample`."""
    return [*BASE_COLUMNS, trait, "coherence", "sample"]


def read_csv(path: str | Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV; a clear error when it is missing or not a generation CSV."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"{path} does not exist: run `pertoken generate` first")
    csv.field_size_limit(1 << 30)
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    missing = [c for c in BASE_COLUMNS if c not in header]
    if missing:
        raise PertokenError(
            f"{path} lacks the column(s) {', '.join(missing)}: pass a CSV written by "
            "`pertoken generate` (or upstream's generation step)"
        )
    return header, rows


def sample_keys(rows: list[dict]) -> list[tuple[str, int]]:
    """(question_id, j) per row: j is the `sample` column, else the occurrence count."""
    seen: dict[str, int] = {}
    keys = []
    for r in rows:
        qid = r["question_id"]
        if r.get("sample", "") not in ("", None):
            j = int(r["sample"])
        else:
            j = seen.get(qid, 0)
        seen[qid] = max(seen.get(qid, 0), j + 1)
        keys.append((qid, j))
    return keys


def write_csv_atomic(path: str | Path, header: list[str], rows: list[dict]) -> Path:
    """Write a uniquely named temporary file and rename it, so a reader never sees half a CSV."""
    with atomic_writer(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def parse_score(value) -> float | None:
    """A judged score, or None when missing (empty, 'nan', unparsable)."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if x != x else x
