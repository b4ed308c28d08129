"""Trace stores (docs/CONVENTIONS.md "Trace stores") read with pyarrow for the lab page.

A store is a folder with tokens.parquet and items.parquet. Stores are found once at start-up
and named by their folder; requests pick a store by that name from a fixed table, so no part
of a request ever becomes a path."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.serve.protocol import ApiError

TOKEN_FIELDS = ("pos", "token_id", "token", "turn", "role", "segment")
MAX_ITEMS = 5000  # rows of items.parquet sent per page


@dataclass
class Store:
    name: str
    path: Path
    model: str | None = None  # set when the store was traced with another model


class TraceStores:
    """The stores under the folders given to --traces."""

    def __init__(self, folders: list[str | Path]):
        self.stores: dict[str, Store] = {}
        for folder in folders:
            for path in _stores_in(Path(folder)):
                name = _unique(path.name, self.stores)
                self.stores[name] = Store(name, path)

    def check_model(self, model_id: str) -> list[str]:
        """Marks the stores traced with another model; a line for each."""
        lines = []
        for s in self.stores.values():
            traced = _traced_model(s.path)
            if traced is not None and traced != model_id:
                s.model = traced
                lines.append(
                    f"trace store {s.name} was traced with {traced}, not {model_id}: the lab "
                    "page marks it (its projections are that model's)"
                )
        return lines

    def listing(self) -> list[dict]:
        """Each store's name and item count; `damaged` (why) for one that cannot be read."""
        import pyarrow.parquet as pq

        out = []
        for s in self.stores.values():
            entry = {"name": s.name} | ({"model": s.model} if s.model else {})
            try:
                with _reading(s, "tokens.parquet") as path:
                    pq.read_metadata(path)
                with _reading(s, "items.parquet") as path:
                    entry["items"] = pq.read_metadata(path).num_rows
            except ApiError as e:
                entry["damaged"] = e.message
            out.append(entry)
        return out

    def items(self, name: str, offset: int = 0, limit: int = MAX_ITEMS) -> dict:
        """Columns and rows of items.parquet (JSON-safe: NaN becomes null)."""
        import pyarrow.parquet as pq

        with _reading(self._store(name), "items.parquet") as path:
            table = pq.read_table(path)
        start = min(max(0, offset), table.num_rows)  # any integer, however large
        page = table.slice(start, max(0, min(limit, MAX_ITEMS)))
        return {"columns": page.column_names, "rows": _rows(page), "total": table.num_rows}

    def tokens(self, name: str, item: str) -> dict:
        """One item's tokens: their text fields and every float column (proj, cos, norm)."""
        import pyarrow.parquet as pq

        with _reading(self._store(name), "tokens.parquet") as path:
            schema = pq.read_schema(path)
            value = _item_value(item, schema.field("item").type)
            table = pq.read_table(path, filters=[("item", "==", value)]).sort_by("pos")
        if table.num_rows == 0:
            raise ApiError(404, f"store {name!r} has no item {item!r}", code="not_found")
        fields = [f for f in TOKEN_FIELDS if f in table.column_names]
        values = [c for c in table.column_names if c.startswith(("proj.", "pre.", "cos.", "norm."))]
        return {
            "fields": {f: _json_list(table.column(f).to_pylist()) for f in fields},
            "values": {c: _json_list(table.column(c).to_pylist()) for c in values},
        }

    def routes(self, app, guard) -> None:
        @app.get("/api/traces", dependencies=guard)
        async def stores():
            return {"stores": self.listing()}

        @app.get("/api/traces/{name}/items", dependencies=guard)
        async def items(name: str, offset: int = 0, limit: int = MAX_ITEMS):
            return self.items(name, offset, limit)

        @app.get("/api/traces/{name}/tokens", dependencies=guard)
        async def tokens(name: str, item: str):
            return self.tokens(name, item)

    def _store(self, name: str) -> Store:
        if name not in self.stores:
            raise ApiError(404, f"no trace store named {name!r}", code="not_found")
        return self.stores[name]


def _stores_in(folder: Path) -> list[Path]:
    """The folder itself when it is a store, else the stores one level below it."""
    if _is_store(folder):
        return [folder]
    found = (
        sorted(p for p in folder.iterdir() if p.is_dir() and _is_store(p))
        if folder.is_dir()
        else []
    )
    if not found:
        raise PertokenError(
            f"--traces {folder} holds no trace store (tokens.parquet and items.parquet): "
            "pass a folder written by `pertoken trace`, or one that holds such folders"
        )
    return found


def _is_store(path: Path) -> bool:
    return (path / "tokens.parquet").is_file() and (path / "items.parquet").is_file()


def _unique(name: str, taken: dict) -> str:
    out, k = name, 2
    while out in taken:
        out, k = f"{name}-{k}", k + 1
    return out


@contextmanager
def _reading(store: Store, file: str):
    """The path of one of the store's files; a file pyarrow cannot read is a 409 that says
    what to do."""
    import pyarrow as pa

    try:
        yield store.path / file
    except (OSError, pa.ArrowException, KeyError) as e:
        why = " ".join(str(e).split())[:200]
        raise ApiError(
            409,
            f"trace store {store.name!r} is damaged: {file} cannot be read ({why}); remove the "
            "store, or rerun pertoken trace on its folder to rebuild it",
            code="damaged_store",
        ) from None


def _traced_model(path: Path) -> str | None:
    try:
        model = json.loads((path / "trace.json").read_text(encoding="utf-8")).get("model")
    except (OSError, ValueError, AttributeError):  # no settings to compare with
        return None
    return model if isinstance(model, str) else None


def _item_value(item: str, kind):
    import numpy as np
    import pyarrow as pa

    if pa.types.is_integer(kind):
        try:
            value = int(item)
        except ValueError:
            raise ApiError(400, f"item {item!r} is not an integer", param="item") from None
        bounds = np.iinfo(kind.to_pandas_dtype())
        if not bounds.min <= value <= bounds.max:
            raise ApiError(400, f"item {item} is out of range for this store", param="item")
        return value
    return item


def _json_list(values: list) -> list:
    return [None if isinstance(v, float) and not math.isfinite(v) else v for v in values]


def _rows(table) -> list[list]:
    columns = [_json_list(table.column(c).to_pylist()) for c in table.column_names]
    return [list(row) for row in zip(*columns)]
