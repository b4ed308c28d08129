"""The two tables of a trace store, built from token labels and per-token projections.

tokens: `item, pos, token_id, token, turn, role, segment`, then float32 `proj.{vector}.L{row}`,
`cos.{vector}.L{row}`, `norm.L{row}`. items: `item`, metadata, `n_tokens`, `input_sha256`,
then per vector x row, for each segment, `mean|max|min.{vector}.L{row}.{segment}`, and
`prompt_last.{vector}.L{row}` (the last token before the first answer token).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pertoken.pipeline.trace.segments import TokenLabels

STATS = ("mean", "max", "min")


def proj_column(vector: str, row: int) -> str:
    return f"proj.{vector}.L{row}"


def value_columns(vectors: list[str], rows: list[int]) -> list[str]:
    """proj and cos per vector x row, then norm per row, in that order."""
    proj = [proj_column(v, r) for v in vectors for r in rows]
    cos = [f"cos.{v}.L{r}" for v in vectors for r in rows]
    return proj + cos + [f"norm.L{r}" for r in rows]


def stat_columns(vectors: list[str], rows: list[int], segments: list[str]) -> list[str]:
    out = []
    for v in vectors:
        for r in rows:
            out += [f"{s}.{v}.L{r}.{seg}" for seg in segments for s in STATS]
            out.append(f"prompt_last.{v}.L{r}")
    return out


def drop_empty_segments(items: pa.Table) -> pa.Table:
    """`items` without the statistics of tag segments (scratchpad, thinking) that no item has:
    columns of NaN only. A rerun that adds items with such a span brings them back."""
    from pertoken.pipeline.trace.segments import BUILTIN

    by_segment: dict[str, list[str]] = {}
    for name in items.column_names:
        parts = name.split(".")
        if parts[0] in STATS and len(parts) >= 4 and parts[-1] not in BUILTIN:
            by_segment.setdefault(parts[-1], []).append(name)
    empty = [
        c
        for cols in by_segment.values()
        if all(np.isnan(items[c].to_numpy(zero_copy_only=False).astype(float)).all() for c in cols)
        for c in cols
    ]
    return items.drop_columns(empty) if empty else items


def token_schema(vectors: list[str], rows: list[int], pre: list[str] = ()) -> pa.Schema:
    """The tokens table's columns; `pre` adds float32 `pre.{vector}.L{row}` columns."""
    fixed = [
        ("item", pa.int32()),
        ("pos", pa.int32()),
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("turn", pa.int16()),
        ("role", pa.string()),
        ("segment", pa.string()),
    ]
    values = value_columns(vectors, rows) + list(pre)
    return pa.schema(fixed + [(c, pa.float32()) for c in values])


def item_schema(meta: dict[str, str], vectors, rows, segments, fired=()) -> pa.Schema:
    """`meta` maps each metadata column to `float` or `string`; `fired` names a bool column
    per conditional steering term."""
    kinds = {"float": pa.float64(), "string": pa.string()}
    fields = [("item", pa.int32())] + [(k, kinds[t]) for k, t in meta.items()]
    fields += [("n_tokens", pa.int32()), ("input_sha256", pa.string())]
    fields += [(c, pa.float32()) for c in stat_columns(vectors, rows, segments)]
    return pa.schema(fields + [(c, pa.bool_()) for c in fired])


def split_values(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[T, R, V + 1] from token_projections -> proj [T, R, V], cos [T, R, V], norm [T, R]."""
    proj, norm = values[..., :-1], values[..., -1]
    cos = np.divide(proj, norm[..., None], out=np.zeros_like(proj), where=norm[..., None] > 0)
    return proj, cos, norm


def tokens_table(
    item: int, labels: TokenLabels, values: np.ndarray, vectors, rows, pre: dict | None = None
) -> pa.Table:
    """One item's token rows; `values` is its [T, R, V + 1] from token_projections, `pre`
    its projections before steering, pre column -> [T]."""
    proj, cos, norm = split_values(values)
    T = len(labels.ids)
    cols = {
        "item": np.full(T, item, np.int32),
        "pos": np.arange(T, dtype=np.int32),
        "token_id": np.asarray(labels.ids, np.int32),
        "token": labels.pieces,
        "turn": labels.turn.astype(np.int16),
        "role": labels.role,
        "segment": labels.segment,
    }
    for kind, arr in (("proj", proj), ("cos", cos)):
        for k, v in enumerate(vectors):
            for j, r in enumerate(rows):
                cols[f"{kind}.{v}.L{r}"] = arr[:, j, k]
    for j, r in enumerate(rows):
        cols[f"norm.L{r}"] = norm[:, j]
    cols |= pre or {}
    return pa.Table.from_pydict(cols, schema=token_schema(vectors, rows, list(pre or {})))


def item_stats(labels: TokenLabels, values: np.ndarray, vectors, rows, segments) -> dict:
    """mean/max/min projection per segment and prompt_last, per vector x row (NaN if none)."""
    proj = values[..., :-1]  # [T, R, V]
    seg = np.asarray(labels.segment)
    out = {}
    for name in segments:
        part = proj[seg == name]  # [n, R, V]
        empty = np.full(proj.shape[1:], np.nan)
        stats = [f(part, axis=0) if len(part) else empty for f in (np.mean, np.max, np.min)]
        for s, arr in zip(STATS, stats):
            for k, v in enumerate(vectors):
                for j, r in enumerate(rows):
                    out[f"{s}.{v}.L{r}.{name}"] = float(arr[j, k])
    last = proj[labels.prompt_len - 1] if labels.prompt_len >= 1 else None  # [R, V]
    for k, v in enumerate(vectors):
        for j, r in enumerate(rows):
            out[f"prompt_last.{v}.L{r}"] = float("nan") if last is None else float(last[j, k])
    return out
