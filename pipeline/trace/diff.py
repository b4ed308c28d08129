"""trace-diff: two stores of the same transcripts (a base and a fine-tuned model, or unsteered
and steered) as one store of per-token differences B - A, with the items that moved most.

The difference store has the layout of any trace store (its proj/cos/norm columns and item
statistics hold B - A), so trace-stats and the page read it as they read a trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.trace import store as store
from pertoken.pipeline.trace.segments import TokenLabels
from pertoken.pipeline.trace.tables import (
    drop_empty_segments,
    item_schema,
    item_stats,
    proj_column,
    token_schema,
    value_columns,
)

_TOKEN_KEYS = ("item", "pos", "token_id", "token", "turn", "role", "segment")


@dataclass
class DiffResult:
    out_dir: Path
    items: int
    moved: list[dict]  # per item: mean and max |B - A| per vector x row
    scale: dict[int, float]  # row -> the largest |h| of A there (what "nothing moved" is against)


def trace_diff(
    a_dir: str | Path, b_dir: str | Path, *, out_dir: str | Path, page=True
) -> DiffResult:
    """Write the store of B - A into `out_dir`, and `moved.csv` (items ranked by how far their
    mean projection moved). Refuses stores of different items, tokens, vectors or rows."""
    a_dir, b_dir, out = Path(a_dir), Path(b_dir), Path(out_dir)
    _check_out(out, a_dir, b_dir)
    sa, sb = store.read_settings(a_dir), store.read_settings(b_dir)
    _check_same(sa, sb, a_dir, b_dir)
    vectors, rows = list(sa["vectors"]), sa["rows"]
    segments = ["template", "prompt", "answer", *sa["segments"]]
    items_a, items_b = _items(a_dir), _items(b_dir)
    if items_a["item"].tolist() != items_b["item"].tolist():
        raise PertokenError(f"{a_dir} and {b_dir} hold different items: trace the same input")
    with output_lock(out, folder=True):
        stats, moved, scale = _diff_tokens(a_dir, b_dir, out, vectors, rows, segments)
        table = _items_table(items_a, items_b, stats, sa, vectors, rows, segments)
        store.write_table_atomic(drop_empty_segments(table), out / store.ITEMS)
        settings = _settings(sa, sb, a_dir, b_dir)
        store.write_json_atomic(out / store.SETTINGS, settings)
        write_csv_atomic(out / "moved.csv", list(moved[0]) if moved else [], moved)
        if page:
            from pertoken.pipeline.trace.page import write_store_page

            write_store_page(out, title=f"pertoken trace diff: {settings['model']}")
    return DiffResult(out, len(items_a), moved, scale)


def _check_out(out: Path, *inputs: Path) -> None:
    """The output folder is neither an input store nor inside one (it would overwrite it)."""
    full = os.path.realpath(out)
    for folder in inputs:
        root = os.path.realpath(folder)
        if os.path.commonpath([root, full]) == root:
            raise PertokenError(
                f"--out {out} is {'the store' if full == root else 'inside the store'} {folder}: "
                "trace-diff would overwrite it; choose an --out outside both stores"
            )


def _check_same(sa: dict, sb: dict, a_dir: Path, b_dir: Path) -> None:
    for name in sa["vectors"]:
        a, b = sa["vectors"][name], sb["vectors"].get(name)
        if b is not None and a.get("sha256") != b.get("sha256"):
            raise PertokenError(
                f"{a_dir} and {b_dir} traced vector {name!r} from different files "
                f"({a.get('file')} vs {b.get('file')}, sha256 differs): trace both with the "
                "same vector file"
            )
    for key in ("vectors", "rows", "segments"):
        a = list(sa[key]) if key == "vectors" else sa[key]
        b = list(sb[key]) if key == "vectors" else sb[key]
        if a != b:
            raise PertokenError(
                f"{a_dir} and {b_dir} were traced with different {key} ({a} vs {b}): trace "
                "both with the same --vector names, --layers and --segment"
            )


def _items(folder: Path):
    return store.read_items_table(folder)


def _diff_tokens(a_dir, b_dir, out, vectors, rows, segments):
    """Stream both token tables item by item into out/tokens.parquet as B - A."""
    values = value_columns(vectors, rows)
    stats, moved, scale = {}, [], dict.fromkeys(rows, 0.0)
    pairs = zip(
        store.iter_item_tables(a_dir / store.TOKENS), store.iter_item_tables(b_dir / store.TOKENS)
    )
    # a failure (tokens that differ) leaves no half-written table behind
    with store.RowGroupWriter(out / store.TOKENS, token_schema(vectors, rows)) as writer:
        for (ia, ta), (ib, tb) in pairs:
            same = ia == ib and np.array_equal(ta["token_id"].to_numpy(), tb["token_id"].to_numpy())
            if not same:
                raise PertokenError(
                    f"{a_dir} and {b_dir} hold different tokens (item {ia}): trace the same input "
                    "with models that share a tokenizer"
                )
            cols = {k: ta[k] for k in _TOKEN_KEYS}
            diff = {c: pa.array(tb[c].to_numpy() - ta[c].to_numpy()) for c in values}
            writer.add(pa.table(cols | diff))
            stats[ia] = _stats(ta, diff, vectors, rows, segments)
            moved.append(_moved(ia, ta, diff, vectors, rows))
            for r in rows:
                scale[r] = max(scale[r], float(np.abs(ta[f"norm.L{r}"].to_numpy()).max(initial=0)))
    return stats, moved, scale


def _stats(ta, diff: dict, vectors, rows, segments) -> dict:
    """Segment statistics of the difference (prompt_last comes from the items tables)."""
    proj = np.stack([[diff[proj_column(v, r)].to_numpy() for v in vectors] for r in rows])
    values = np.concatenate([proj.transpose(2, 0, 1), np.zeros((proj.shape[2], len(rows), 1))], -1)
    labels = TokenLabels([], [], np.zeros(0), [], ta["segment"].to_pylist(), prompt_len=0)
    return item_stats(labels, values, vectors, rows, segments)


def _moved(item: int, ta, diff: dict, vectors, rows) -> dict:
    seg = np.asarray(ta["segment"].to_pylist())
    answer = seg != "template"
    out = {"item": item, "n_tokens": ta.num_rows}
    for v in vectors:
        for r in rows:
            d = diff[proj_column(v, r)].to_numpy()
            out[f"mean.{v}.L{r}"] = float(d[answer].mean()) if answer.any() else float("nan")
            out[f"max_abs.{v}.L{r}"] = float(np.abs(d).max()) if len(d) else float("nan")
    return out


def _items_table(items_a, items_b, stats: dict, sa: dict, vectors, rows, segments) -> pa.Table:
    schema = item_schema(sa.get("meta", {}), vectors, rows, segments)
    meta = [c for c in sa.get("meta", {}) if c in items_a.columns]
    records = []
    for (_, a), (_, b) in zip(items_a.iterrows(), items_b.iterrows()):
        rec = {"item": int(a["item"]), **{c: _none(a[c]) for c in meta}}
        rec |= {"n_tokens": int(a["n_tokens"]), "input_sha256": a["input_sha256"]}
        rec |= stats[int(a["item"])]
        for v in vectors:
            for r in rows:
                col = f"prompt_last.{v}.L{r}"
                rec[col] = float(b[col]) - float(a[col])
        records.append(rec)
    return pa.Table.from_pylist(records, schema=schema)


def _none(x):
    return None if isinstance(x, float) and not np.isfinite(x) else x


def _settings(sa: dict, sb: dict, a_dir: Path, b_dir: Path) -> dict:
    keep = ("vectors", "rows", "segments", "meta", "input", "columns")
    return {
        **{k: sa.get(k) for k in keep},
        "model": f"{sb.get('model')} - {sa.get('model')}",
        "diff": {"a": str(a_dir), "b": str(b_dir), "a_settings": sa, "b_settings": sb},
        "complete": True,
    }


# |B - A| below this share of |h| is float noise, not a move.
NOISE = 1e-6


@dataclass
class Moved:
    """How one vector x row moved: the statistic items are ranked by, and the top items."""

    vector: str
    row: int
    stat: str | None  # "mean" (over non-template tokens), "max_abs", or None: nothing moved
    peak: float  # the largest |B - A| of that statistic over items
    top: list[dict]


def most_moved(res: DiffResult, vector: str, row: int, top: int = 5) -> Moved:
    """The `top` items that moved most at `vector` x `row`: by |mean B - A| when means moved,
    else by max |B - A| of a token (a move the means average away); nothing when neither did."""
    tol = NOISE * max(res.scale.get(row, 0.0), 1.0)
    for stat in ("mean", "max_abs"):
        key = f"{stat}.{vector}.L{row}"
        ranked = [m for m in res.moved if np.isfinite(m[key])]
        ranked.sort(key=lambda m: -abs(m[key]))
        if ranked and abs(ranked[0][key]) > tol:
            return Moved(vector, row, stat, abs(ranked[0][key]), ranked[:top])
    return Moved(vector, row, None, 0.0, [])


def moved_most(res: DiffResult, vectors, rows, top: int = 3) -> list[Moved]:
    """most_moved of every vector x row, those that moved most first (means before maxima)."""
    found = [most_moved(res, v, r, top) for v in vectors for r in rows]
    order = {"mean": 0, "max_abs": 1, None: 2}
    return sorted(found, key=lambda m: (order[m.stat], -m.peak / max(res.scale[m.row], 1e-12)))
