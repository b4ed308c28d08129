"""trace.html for a trace store: an item list, and the chosen item's tokens, chart and heatmap.

The page holds the item list inline; each item's tokens live in `trace_page/items-NNNNN.js`
beside it (BLOCK items a file), loaded with a <script> element only when an item is chosen, so
a large store never puts megabytes into the page and the page opens from file:// with no
server. Data goes through embed_json (no `<`, `>` or `&` survives) and the page renders token
text with textContent only. The first token of each item (many models' attention sink) is left
out of the dataset mean and the colour scales.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

import numpy as np

from pertoken.atomic import write_text_atomic
from pertoken.pipeline.trace.store import (
    TOKENS,
    iter_item_tables,
    read_items_table,
    read_settings,
)

_TEMPLATE = Path(__file__).with_name("page.html")
KIT_JS, KIT_CSS = Path(__file__).with_name("kit.js"), Path(__file__).with_name("kit.css")
BLOCK = 32  # items per data file
DIGITS = 6  # significant digits kept for the page


def write_store_page(folder: str | Path, *, title: str | None = None) -> Path:
    """Write `trace.html` and `trace_page/` into the store folder; returns the page's path."""
    folder = Path(folder)
    settings = read_settings(folder)
    vectors, rows = list(settings["vectors"]), settings["rows"]
    segments = list(settings["segments"])
    segments = ["template", "prompt", "answer", *segments]
    data_dir = folder / "trace_page"
    shutil.rmtree(data_dir, ignore_errors=True)
    data_dir.mkdir()
    items = read_items_table(folder)
    acc = _Scales(len(vectors), len(rows))
    blocks = _Blocks(data_dir)
    empty = _empty_item(len(vectors), len(rows))
    ids, previews = iter(items["item"].astype(int).tolist()), {}
    for item, table in iter_item_tables(folder / TOKENS):
        while (gap := next(ids, item)) != item:
            blocks.add(gap, empty)
        data, previews[item] = _item_data(table, vectors, rows, segments, acc)
        blocks.add(item, data)
    for gap in ids:
        blocks.add(gap, empty)
    blocks.close()
    index = _index(settings, items, previews, vectors, rows, segments, acc)
    title = title or f"pertoken trace: {settings.get('model')} on {Path(settings['input']).name}"
    page = render(_TEMPLATE.read_text(encoding="utf-8"), title, embed_json(index))
    path = folder / "trace.html"
    write_text_atomic(path, page)
    return path


def embed_json(data) -> str:
    """JSON safe to place inside a <script> element."""
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(ch, esc)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def render(template: str, title: str, data: str) -> str:
    """A page template filled in: its title, its data, and the page kit inlined (so the page
    opens from file:// with no network)."""
    head, tail = template.split("__DATA__")
    head = head.replace("__TITLE__", html.escape(title))
    head = head.replace("__KIT_CSS__", KIT_CSS.read_text(encoding="utf-8"))
    return head + data + tail.replace("__KIT_JS__", KIT_JS.read_text(encoding="utf-8"))


def _round(a: np.ndarray) -> list:
    """Nested lists rounded to DIGITS significant digits of the largest value; null where not
    finite (JSON has no NaN)."""
    a = np.asarray(a, np.float64)
    finite = np.isfinite(a)
    top = np.abs(a[finite]).max() if finite.any() else 0.0
    decimals = DIGITS - 1 - int(np.floor(np.log10(top))) if top > 0 else DIGITS
    out = np.round(a, decimals)
    return out.tolist() if finite.all() else np.where(finite, out, None).tolist()


class _Scales:
    """Streaming sums and extremes per vector x row, leaving out each item's first token."""

    def __init__(self, V: int, R: int):
        self.sum, self.n = np.zeros((V, R)), 0
        self.proj_max = np.zeros((V, R))  # max |proj|
        self.cos_max = np.zeros((V, R))
        self.lo, self.hi = np.full((V, R), np.inf), np.full((V, R), -np.inf)

    def add(self, proj: np.ndarray, cos: np.ndarray) -> None:
        """proj, cos: [V, R, T] of one item, first token already left out."""
        if proj.shape[-1] == 0:
            return
        self.sum += proj.sum(-1)
        self.n += proj.shape[-1]
        self.proj_max = np.maximum(self.proj_max, np.abs(proj).max(-1))
        self.cos_max = np.maximum(self.cos_max, np.abs(cos).max(-1))
        self.lo, self.hi = np.minimum(self.lo, proj.min(-1)), np.maximum(self.hi, proj.max(-1))

    def result(self) -> dict:
        mean = self.sum / max(self.n, 1)
        centred = np.maximum(np.abs(self.hi - mean), np.abs(self.lo - mean))
        centred = np.where(np.isfinite(centred), centred, 0)
        return {"mean": mean, "raw": self.proj_max, "centred": centred, "cosine": self.cos_max}


def _item_data(table, vectors, rows, segments, acc: _Scales) -> tuple[dict, str]:
    cols = table.to_pydict()
    proj = np.array([[cols[f"proj.{v}.L{r}"] for r in rows] for v in vectors])  # [V, R, T]
    cos = np.array([[cols[f"cos.{v}.L{r}"] for r in rows] for v in vectors])
    acc.add(proj[..., 1:], cos[..., 1:])
    roles = ["system", "user", "assistant"]
    data = {
        "tokens": cols["token"],
        "segment": [segments.index(s) if s in segments else 0 for s in cols["segment"]],
        "role": [roles.index(r) for r in cols["role"]],
        "turn": cols["turn"],
        "proj": _round(proj),
        "cos": _round(cos),
    }
    if "features" in cols:  # a monitor run's SAE features: [token] -> [{id, act}]
        data["features"] = [
            [{"id": f["id"], "act": float(f"{f['act']:.6g}")} for f in feats or []]
            for feats in cols["features"]
        ]
    return data, _preview(cols)


def _empty_item(V: int, R: int) -> dict:
    """An item with no tokens (a monitored answer cut off at once): it keeps its place."""
    none = [[[] for _ in range(R)] for _ in range(V)]
    return {"tokens": [], "segment": [], "role": [], "turn": [], "proj": none, "cos": none}


def _preview(cols: dict) -> str:
    """The first user text of an item (or its first text), for the item list."""
    picked = [
        t
        for t, r, s in zip(cols["token"], cols["role"], cols["segment"])
        if r == "user" and s != "template"
    ]
    text = "".join(picked or cols["token"]).strip()
    return " ".join(text.split())[:80]


class _Blocks:
    """The page's data files: `items-NNNNN.js`, BLOCK items each, in item order."""

    def __init__(self, folder: Path):
        self.folder, self.n, self.block = folder, 0, {}

    def add(self, item: int, data: dict) -> None:
        self.block[str(item)] = data
        if len(self.block) == BLOCK:
            self.close()

    def close(self) -> None:
        if self.block:
            text = f"pertokenItems({embed_json(self.block)});\n"
            write_text_atomic(self.folder / f"items-{self.n:05d}.js", text)
            self.n, self.block = self.n + 1, {}


def _index(settings, items, previews, vectors, rows, segments, acc: _Scales) -> dict:
    """Everything the page needs before an item is chosen."""
    meta = [c for c, t in settings.get("meta", {}).items() if c in items.columns]
    # The list sorts by the means and prompt_last; max/min and empty segments stay in Parquet.
    stats = [c for c in items.columns if c.split(".")[0] in ("mean", "prompt_last")]
    stats = [c for c in stats if items[c].notna().any()]
    columns = ["item", "n_tokens", *meta, *stats]
    table = []
    for _, row in items[columns].iterrows():
        values = [_cell(row[c]) for c in columns]
        preview = previews.get(int(row["item"]), "")
        if isinstance(row.get("question"), str):  # CSV items: the question, not the template
            preview = " ".join(row["question"].split())[:80]
        table.append([values[0], preview, *values[1:]])
    scales = acc.result()
    return {
        "settings": {k: settings.get(k) for k in ("model", "backend", "dtype", "input")},
        "vectors": vectors,
        "rows": rows,
        "segments": segments,
        "columns": [columns[0], "preview", *columns[1:]],
        "items": table,
        "block": BLOCK,
        "mean": _round(scales["mean"]),
        "scale": {k: _round(scales[k]) for k in ("raw", "centred", "cosine")},
    }


def _cell(x):
    if isinstance(x, str):
        return x[:200]
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return float(f"{x:.4g}") if np.isfinite(x) else None
