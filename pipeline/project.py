"""Projection columns for generation CSVs (CONVENTIONS):
`{model_basename}_{vector_file_stem}_{proj|prompt_last_proj|cos_sim}_layer{L}`."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.projection import cosine, project
from pertoken.vectors import load_vector

BASE_COLUMNS = ("question", "prompt", "answer", "question_id")


@dataclass
class ProjectResult:
    out_path: Path
    columns: list[str]  # the proj, prompt_last_proj and cos_sim column names, in that order
    n_rows: int
    trait: str | None  # the trait score column, when the file has one
    r: float | None  # Pearson r between proj and the trait score (None when not computable)
    n_scored: int  # rows with a trait score, used for r


def column_names(model_id: str, vector_path: str | Path, layer: int) -> list[str]:
    """The three column names for this model, vector file and layer."""
    model = Path(str(model_id).rstrip("/\\")).name
    stem = Path(vector_path).stem
    return [
        f"{model}_{stem}_{kind}_layer{layer}" for kind in ("proj", "prompt_last_proj", "cos_sim")
    ]


def project_csv(
    backend,
    csv_path: str | Path,
    *,
    vector_path: str | Path,
    layer: int,
    out_path: str | Path | None = None,
    batch_size: int = 8,
    chunk_rows: int = 64,
) -> ProjectResult:
    """Add projection columns to a generation CSV and write it to out_path (default: in place).

    proj and cos_sim use the mean residual over the answer tokens, prompt_last_proj the last
    prompt token, all at row `layer`. The Pearson r against the trait column (the fifth, when
    present) is returned. Rows go through the model `chunk_rows` at a time."""
    vec = load_vector(vector_path)
    vec.check_model(backend.n_layers, backend.hidden_size, vector_path)
    v = vec.row(layer)  # [hidden]
    header, rows = _read_csv(csv_path)
    names = column_names(backend.model_id, vector_path, layer)
    values = _project_rows(backend, rows, v, layer, batch_size, chunk_rows)  # [N, 3]
    for row, vals in zip(rows, values, strict=True):
        row.update({n: repr(float(x)) for n, x in zip(names, vals, strict=True)})
    out = Path(out_path) if out_path else Path(csv_path)
    fields = header + [n for n in names if n not in header]
    write_csv_atomic(out, fields, rows)  # a failure never leaves a half-written file
    trait = _trait_column(header)
    r, n = pearson_with(rows, names[0], trait) if trait else (None, 0)
    return ProjectResult(out, names, len(rows), trait, r, n)


def _project_rows(backend, rows, v, layer, batch_size, chunk_rows) -> np.ndarray:
    out = []
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        s = backend.summaries(
            [r["prompt"] for r in chunk], [r["answer"] for r in chunk], batch_size=batch_size
        )
        resp, last = s.response_avg[:, layer], s.prompt_last[:, layer]  # [n, hidden] each
        out.append(np.stack([project(resp, v), project(last, v), cosine(resp, v)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3))


def pearson_with(rows: list[dict], x_col: str, y_col: str) -> tuple[float | None, int]:
    """Pearson r of two columns over rows where both are numbers; (None, n) if undefined."""
    pairs = [(_num(r.get(x_col)), _num(r.get(y_col))) for r in rows]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if len(pairs) < 2:
        return None, len(pairs)
    x, y = np.array(pairs, dtype=np.float64).T
    if x.std() == 0 or y.std() == 0:
        return None, len(pairs)
    return float(np.corrcoef(x, y)[0, 1]), len(pairs)


def _num(text) -> float | None:
    try:
        x = float(text)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _trait_column(header: list[str]) -> str | None:
    """The fifth column, when the file follows the generation layout and has one."""
    if len(header) >= 5 and header[4] not in ("coherence",) and "_layer" not in header[4]:
        return header[4]
    return None


def _read_csv(path) -> tuple[list[str], list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"CSV file {path} does not exist: check the path")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        missing = [c for c in ("prompt", "answer") if c not in header]
        if missing:
            raise PertokenError(
                f"{path} has no {' or '.join(missing)} column: pass a generation CSV with "
                f"columns {', '.join(BASE_COLUMNS)}, {{trait}}, coherence"
            )
        rows = list(reader)
    for i, r in enumerate(rows):
        if r["prompt"] is None or r["answer"] is None:
            raise PertokenError(f"{path} row {i + 2} is short: it has no prompt or answer")
    return header, rows
