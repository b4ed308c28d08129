"""trace-stats: where in a dataset's transcripts a trait shows up, from a trace store.

- correlations.csv: Pearson and Spearman r between every per-item statistic (mean, max, min
  projection per segment; prompt_last) and every score column;
- curves.csv / curves.png: the mean projection over relative position in the answer (deciles),
  per score tercile;
- spans.csv: windows of `span` answer tokens with the highest and lowest mean projection (at
  most one per item in each list), with their text;
- correlations.png: Pearson r of the mean per segment and prompt_last with the first score.
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.trace.plots import plot_correlations, plot_curves
from pertoken.pipeline.trace.store import (
    TOKENS,
    iter_item_tables,
    read_items_table,
    read_settings,
)
from pertoken.pipeline.trace.tables import STATS, proj_column

DECILES = 10
TERCILES = ("low", "mid", "high")


@dataclass
class StatsResult:
    scores: list[str]
    correlations: list[dict]
    curves: list[dict]
    spans: list[dict]
    files: list[Path] = field(default_factory=list)


def default_scores(settings: dict, columns) -> list[str]:
    """Numeric metadata columns, but not a sample counter."""
    meta = settings.get("meta", {})
    return [c for c, t in meta.items() if t == "float" and c != "sample" and c in columns]


def trace_stats(
    folder: str | Path,
    *,
    scores: list[str] | None = None,
    span: int = 8,
    top: int = 10,
    out_dir: str | Path | None = None,
) -> StatsResult:
    """Correlations, decile curves and top spans of a store; writes CSVs and PNGs into
    `out_dir` (default `{folder}/stats`). scores: the score columns (default: numeric ones)."""

    folder = Path(folder)
    settings = read_settings(folder)
    items = read_items_table(folder)
    scores = list(scores) if scores else default_scores(settings, items.columns)
    missing = [s for s in scores if s not in items.columns]
    if missing:
        raise PertokenError(
            f"{folder} has no score column {missing[0]!r}: pick one of "
            f"{', '.join(default_scores(settings, items.columns)) or '(none)'}"
        )
    if span < 1:
        raise PertokenError(f"--span must be at least 1, not {span}")
    vectors, rows = list(settings["vectors"]), settings["rows"]
    segments = ["template", "prompt", "answer", *settings["segments"]]
    result = StatsResult(scores, correlate(items, scores, vectors, rows, segments), [], [])
    deciles, spans = _token_pass(folder, vectors, rows, span, top)
    result.curves = tercile_curves(items, deciles, scores, vectors, rows)
    result.spans = spans
    result.files = _write(Path(out_dir) if out_dir else folder / "stats", result, vectors, rows)
    return result


def correlate(items, scores, vectors, rows, segments) -> list[dict]:
    """One row per statistic x score: n, Pearson r and Spearman r (None when undefined)."""
    out = []
    for v in vectors:
        for r in rows:
            cols = [(s, seg, f"{s}.{v}.L{r}.{seg}") for seg in segments for s in STATS]
            cols = [c for c in cols if c[2] in items.columns]  # no item has that segment
            cols.append(("prompt_last", "", f"prompt_last.{v}.L{r}"))
            for stat, seg, col in cols:
                for score in scores:
                    row = {"stat": stat, "vector": v, "layer": r, "segment": seg, "score": score}
                    out.append(row | _r(items[col].to_numpy(float), items[score].to_numpy(float)))
    return out


def _r(x: np.ndarray, y: np.ndarray) -> dict:
    """n, Pearson and Spearman r over the pairs where both are numbers."""
    from scipy import stats

    ok = np.isfinite(x) & np.isfinite(y)
    out = {"n": int(ok.sum()), "pearson": None, "spearman": None}
    if ok.sum() >= 3:
        with warnings.catch_warnings():  # a constant column has no r: it stays None
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            out["pearson"] = _f(stats.pearsonr(x[ok], y[ok])[0])
            out["spearman"] = _f(stats.spearmanr(x[ok], y[ok])[0])
    return out


def _f(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def answer_runs(table) -> list[np.ndarray]:
    """Indices of an item's answer tokens (assistant text, not template), split into runs of
    consecutive positions."""
    role = np.asarray(table["role"].to_pylist())
    seg = np.asarray(table["segment"].to_pylist())
    idx = np.flatnonzero((role == "assistant") & (seg != "template"))
    return np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if len(idx) else []


def _token_pass(folder: Path, vectors, rows, span: int, top: int):
    """One streamed pass over tokens.parquet: answer deciles per item, and top/bottom spans."""
    pairs = [(v, r) for v in vectors for r in rows]
    columns = ["item", "token", "role", "segment", *(proj_column(v, r) for v, r in pairs)]
    deciles: dict[int, np.ndarray] = {}  # item -> [len(pairs), DECILES]
    high = {p: [] for p in pairs}  # heaps of (mean, item, start, text)
    low = {p: [] for p in pairs}
    for item, table in iter_item_tables(folder / TOKENS, columns):
        runs = answer_runs(table)
        answer = np.concatenate(runs) if runs else np.zeros(0, int)
        tokens = table["token"].to_pylist()
        values = np.stack([table[proj_column(v, r)].to_numpy() for v, r in pairs])  # [P, T]
        deciles[item] = _deciles(values[:, answer])
        for k, p in enumerate(pairs):
            best = _extreme_windows(values[k], runs, span)
            if best is None:
                continue
            (hi, hs), (lo, ls) = best
            _push(high[p], (hi, item, hs, "".join(tokens[hs : hs + span])), top)
            _push(low[p], (-lo, item, ls, "".join(tokens[ls : ls + span])), top)
    return deciles, _span_rows(pairs, high, low)


def _span_rows(pairs, high: dict, low: dict) -> list[dict]:
    out = []
    for v, r in pairs:
        for kind, heap, sign in (("high", high[v, r], 1), ("low", low[v, r], -1)):
            for rank, (m, item, pos, text) in enumerate(sorted(heap, reverse=True), start=1):
                head = {"vector": v, "layer": r, "kind": kind, "rank": rank, "item": item}
                out.append(head | {"pos": pos, "mean": sign * m, "text": text})
    return out


def _deciles(values: np.ndarray) -> np.ndarray:
    """[P, n] over an answer -> [P, DECILES] mean per tenth of its length (NaN if empty)."""
    P, n = values.shape
    out = np.full((P, DECILES), np.nan)
    bins = (np.arange(n) * DECILES) // max(n, 1)
    for d in range(DECILES):
        if np.any(bins == d):
            out[:, d] = values[:, bins == d].mean(axis=1)
    return out


def _extreme_windows(values: np.ndarray, runs, span: int):
    """((max mean, start), (min mean, start)) over windows of `span` inside answer runs."""
    best = None
    for run in runs:
        if len(run) < span:
            continue
        c = np.concatenate([[0.0], np.cumsum(values[run], dtype=np.float64)])
        means = (c[span:] - c[:-span]) / span  # [len(run) - span + 1]
        hi, lo = int(np.argmax(means)), int(np.argmin(means))
        cand = ((means[hi], int(run[hi])), (means[lo], int(run[lo])))
        if best is None:
            best = cand
        else:
            best = (max(best[0], cand[0]), min(best[1], cand[1]))
    return best


def _push(heap: list, entry: tuple, top: int) -> None:
    if len(heap) < top:
        heapq.heappush(heap, entry)
    elif entry > heap[0]:
        heapq.heapreplace(heap, entry)


def tercile_curves(items, deciles: dict, scores, vectors, rows) -> list[dict]:
    """Mean answer-decile curve per score tercile, one row per score x tercile x vector x
    row x decile."""
    pairs = [(v, r) for v in vectors for r in rows]
    out = []
    for score in scores:
        y = items[score].to_numpy(float)
        ok = np.isfinite(y)
        if ok.sum() < 3:
            continue
        cuts = np.quantile(y[ok], [1 / 3, 2 / 3])
        group = np.where(y <= cuts[0], 0, np.where(y <= cuts[1], 1, 2))
        for g, name in enumerate(TERCILES):
            ids = items["item"].to_numpy()[ok & (group == g)]
            if not len(ids):
                continue
            stack = np.stack([deciles[int(i)] for i in ids])  # [n, P, DECILES]
            with warnings.catch_warnings():  # a decile no item reaches stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                curve = np.nanmean(stack, axis=0)
            lo, hi = float(y[ok & (group == g)].min()), float(y[ok & (group == g)].max())
            head = {"score": score, "tercile": name, "score_min": lo, "score_max": hi}
            for k, (v, r) in enumerate(pairs):
                for d in range(DECILES):
                    row = {"vector": v, "layer": r, "decile": d + 1, "items": len(ids)}
                    out.append(head | row | {"mean": _f(curve[k, d])})
    return out


def _write(out: Path, result: StatsResult, vectors, rows) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [
        _csv(out / "correlations.csv", result.correlations),
        _csv(out / "curves.csv", result.curves),
        _csv(out / "spans.csv", result.spans),
    ]
    if result.scores:
        files.append(
            plot_correlations(
                out / "correlations.png", result.correlations, result.scores[0], vectors, rows
            )
        )
        files.append(
            plot_curves(out / "curves.png", result.curves, result.scores[0], vectors, rows)
        )
    return files


def _csv(path: Path, rows: list[dict]) -> Path:
    return write_csv_atomic(path, list(rows[0]) if rows else [], rows)
