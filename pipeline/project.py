"""Projection columns for generation CSVs (docs/CONVENTIONS.md):
`{model_basename}_{vector_file_stem}_{proj|prompt_last_proj|cos_sim}_layer{L}`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import BASE_COLUMNS, parse_score, read_table, write_csv_atomic
from pertoken.pipeline.projection import cosine, project
from pertoken.vectors import load_vector


@dataclass
class Pearson:
    """Pearson r of a projection column with the trait score, over rows where both are numbers."""

    column: str
    r: float | None  # None when undefined
    n: int
    why: str = ""  # why r is undefined


@dataclass
class ProjectResult:
    out_path: Path
    columns: list[str]  # the proj, prompt_last_proj and cos_sim column names, in that order
    n_rows: int
    trait: str | None  # the trait score column, when the file has one
    correlations: list[Pearson]  # proj and prompt_last_proj against the trait (empty without)


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
    prompt token, all at row `layer`. The Pearson r of proj and of prompt_last_proj (the
    paper's monitor) against the trait column (the fifth, when present) is returned. Rows go
    through the model `chunk_rows` at a time."""
    vec = load_vector(vector_path)
    vec.check_model(backend.n_layers, backend.hidden_size, vector_path)
    vec.check_nonzero([layer], vector_path)
    v = vec.row(layer)  # [hidden]
    header, rows = _read_rows(csv_path)
    names = column_names(backend.model_id, vector_path, layer)
    values = _project_rows(backend, rows, v, layer, batch_size, chunk_rows)  # [N, 3]
    for row, vals in zip(rows, values, strict=True):
        row.update({n: repr(float(x)) for n, x in zip(names, vals, strict=True)})
    out = Path(out_path) if out_path else Path(csv_path)
    fields = header + [n for n in names if n not in header]
    write_csv_atomic(out, fields, rows)  # a failure never leaves a half-written file
    trait = _trait_column(header)
    corr = [pearson(rows, c, trait) for c in names[:2]] if trait else []
    return ProjectResult(out, names, len(rows), trait, corr)


def _project_rows(backend, rows, v, layer, batch_size, chunk_rows) -> np.ndarray:
    out = []
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start : start + chunk_rows]
        # eval's answers.csv has the question only: template it with no system prompt, as
        # eval asked it
        prompts = [r.get("prompt") or backend.chat_prompt(None, r["question"]) for r in chunk]
        s = backend.summaries(prompts, [r["answer"] for r in chunk], batch_size=batch_size)
        resp, last = s.response_avg[:, layer], s.prompt_last[:, layer]  # [n, hidden] each
        out.append(np.stack([project(resp, v), project(last, v), cosine(resp, v)], axis=1))
    return np.concatenate(out) if out else np.zeros((0, 3))


def pearson(rows: list[dict], x_col: str, y_col: str) -> Pearson:
    """Pearson r of two columns over rows where both are finite numbers, or why it is undefined."""
    pairs = [(parse_score(r.get(x_col)), parse_score(r.get(y_col))) for r in rows]
    pairs = [(x, y) for x, y in pairs if x is not None and y is not None]
    if len(pairs) < 2:
        return Pearson(x_col, None, len(pairs), f"fewer than 2 rows have a {y_col} score")
    x, y = np.array(pairs, dtype=np.float64).T
    # max == min, not std == 0: the std of a constant column can round to 1e-15
    if y.max() == y.min():
        return Pearson(x_col, None, len(pairs), "the score column is constant")
    if x.max() == x.min():
        return Pearson(x_col, None, len(pairs), "the projection is constant")
    return Pearson(x_col, float(np.corrcoef(x, y)[0, 1]), len(pairs))


def describe_correlations(res: ProjectResult) -> list[str]:
    """One line per r; one line in all when every r is undefined for the same reason."""
    whys = {c.why for c in res.correlations}
    if res.correlations and all(c.r is None for c in res.correlations) and len(whys) == 1:
        return [f"Pearson r is undefined ({whys.pop()})"]
    return [
        f"Pearson r({c.column}, {res.trait}) = {c.r:+.4f} over {c.n} rows"
        if c.r is not None
        else f"Pearson r({c.column}, {res.trait}) is undefined ({c.why})"
        for c in res.correlations
    ]


def _trait_column(header: list[str]) -> str | None:
    """The fifth column, when the file follows the generation layout and has one."""
    if len(header) >= 5 and header[4] not in ("coherence",) and "_layer" not in header[4]:
        return header[4]
    return None


def _read_rows(path) -> tuple[list[str], list[dict]]:
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"CSV file {path} does not exist: check the path")
    header, rows = read_table(path)
    missing = [c for c in ("prompt", "answer") if c not in header]
    if "question" in header and "answer" in header:  # eval's answers.csv
        missing = []
    if missing:
        raise PertokenError(
            f"{path} has no {' or '.join(missing)} column: pass a generation CSV with "
            f"columns {', '.join(BASE_COLUMNS)}, {{trait}}, coherence, or eval's answers.csv"
        )
    return header, rows
