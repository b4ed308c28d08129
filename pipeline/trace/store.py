"""Trace stores on disk (docs/CONVENTIONS.md "Trace stores"): `tokens.parquet`, `items.parquet`,
`trace.json` in one folder, written with pyarrow.

While tracing, each finished chunk of items is a pair of part files under `parts/` (the items
part is written last, so an item is done exactly when its items part exists); at the end the
parts and any earlier store are merged, in item order and streamed row group by row group, into
the two tables. A lock file keeps a second process out of the folder.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pertoken.atomic import atomic_path, write_text_atomic
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.tables import drop_empty_segments, stat_columns, value_columns

TOKENS, ITEMS, SETTINGS = "tokens.parquet", "items.parquet", "trace.json"
ROW_GROUP = 65536  # token rows per row group when merging


def vector_record(vec, path: str | None) -> dict:
    """trace.json's record of a vector: its file, and the sha256 of the file (or of its rows)."""
    data = Path(path).read_bytes() if path else np.ascontiguousarray(vec.data, np.float32).tobytes()
    return {"file": str(path) if path else None, "sha256": hashlib.sha256(data).hexdigest()}


def load(folder: str | Path):
    """(tokens, items) of a trace store as pandas DataFrames."""
    folder = Path(folder)
    for name in (TOKENS, ITEMS):
        if not (folder / name).is_file():
            raise PertokenError(
                f"{folder} has no {name}: give a folder written by `pertoken trace` (an "
                "interrupted trace finishes when its command is run again)"
            )
    with reading(folder / TOKENS):
        tokens = pq.read_table(folder / TOKENS).to_pandas()
    return tokens, read_items_table(folder)


def read_items_table(folder: Path):
    """The store's items table as a pandas DataFrame."""
    with reading(folder / ITEMS):
        return pq.read_table(folder / ITEMS).to_pandas()


@contextmanager
def reading(path: Path):
    """Reads of the Parquet file `path`: a damaged file is one error naming it and the fix."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        if path.parent.name == "parts":
            fix = f"remove {path} (the rerun of `pertoken trace` traces its items again)"
        else:
            fix = (
                f"remove {path.parent / TOKENS} and {path.parent / ITEMS}, then run the "
                "`pertoken trace` command again (it rebuilds them)"
            )
        reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise PertokenError(f"{path} is damaged ({reason}): {fix}") from None


def read_settings(folder: str | Path) -> dict:
    """The store's trace.json, checked against its tables; a clear error when the folder is
    not a finished store."""
    folder = Path(folder)
    try:
        settings = json.loads((folder / SETTINGS).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        msg = f"{folder} is not a trace store: it has no readable {SETTINGS}"
        raise PertokenError(msg) from None
    if not isinstance(settings, dict) or not settings.get("complete"):
        raise PertokenError(
            f"{folder} holds an unfinished trace: run its `pertoken trace` command again"
        )
    if not (folder / TOKENS).is_file() or not (folder / ITEMS).is_file():
        raise PertokenError(
            f"{folder} has no {TOKENS} or {ITEMS}: run its `pertoken trace` command again"
        )
    _check_tables(folder, settings)
    return settings


def check_readable(folder: Path) -> None:
    """The store's tables, where they exist, open as Parquet (their footers are whole)."""
    for name in (TOKENS, ITEMS):
        if (folder / name).is_file():
            with reading(folder / name):
                pq.read_schema(folder / name)


def _check_tables(folder: Path, settings: dict) -> None:
    """trace.json names vectors, rows and segments whose columns the tables hold."""
    vectors, rows, segs = (settings.get(k) for k in ("vectors", "rows", "segments"))
    ok = isinstance(vectors, dict) and isinstance(segs, dict) and isinstance(rows, list)
    if not ok or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise PertokenError(
            f"{folder / SETTINGS} is damaged (vectors, rows or segments unreadable): restore "
            "it, or remove the store and trace again"
        )
    names = ["template", "prompt", "answer"]  # tag segments no item has are left out
    for name, want in ((TOKENS, value_columns(list(vectors), rows)),
                       (ITEMS, stat_columns(list(vectors), rows, names))):  # fmt: skip
        with reading(folder / name):
            have = set(pq.read_schema(folder / name).names)
        missing = [c for c in want if c not in have]
        if missing:
            raise PertokenError(
                f"{folder / SETTINGS} does not match {name} (it has no column {missing[0]}): "
                "restore trace.json, or remove the store and trace again"
            )


def write_json_atomic(path: Path, data: dict) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def write_table_atomic(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


class Parts:
    """Finished chunks of a trace in progress: `parts/{first item}.{tokens,items}.parquet`."""

    def __init__(self, folder: Path):
        self.folder = folder / "parts"

    def write(self, tokens: pa.Table, items: pa.Table) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{int(items['item'][0].as_py()):09d}"
        write_table_atomic(tokens, self.folder / f"{name}.tokens.parquet")
        write_table_atomic(items, self.folder / f"{name}.items.parquet")

    def names(self) -> list[str]:
        """Parts whose items file exists; a tokens file without one was cut off and goes."""
        if not self.folder.is_dir():
            return []
        done = sorted(p.name.split(".")[0] for p in self.folder.glob("*.items.parquet"))
        for p in self.folder.glob("*.tokens.parquet"):
            if p.name.split(".")[0] not in done:
                p.unlink()
        return done

    def path(self, name: str, kind: str) -> Path:
        return self.folder / f"{name}.{kind}.parquet"

    def remove(self) -> None:
        for p in self.folder.glob("*") if self.folder.is_dir() else []:
            p.unlink()
        if self.folder.is_dir():
            self.folder.rmdir()


def done_items(folder: Path) -> dict[int, str]:
    """item -> input_sha256 of every item already traced (finished store and parts)."""
    sources = [folder / ITEMS] if (folder / ITEMS).is_file() else []
    parts = Parts(folder)
    sources += [parts.path(n, "items") for n in parts.names()]
    done: dict[int, str] = {}
    for path in sources:
        with reading(path):
            t = pq.read_table(path, columns=["item", "input_sha256"])
        done.update(zip(t["item"].to_pylist(), t["input_sha256"].to_pylist()))
    return done


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns (missing ones null), cast to its types."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            try:
                cols.append(table[f.name].cast(f.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise PertokenError(
                    f"column {f.name} changed type since this store was written: trace into "
                    "another --out"
                ) from None
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def iter_item_tables(
    path: Path, columns: list[str] | None = None
) -> Iterator[tuple[int, pa.Table]]:
    """(item, its token rows) in file order, reading one record batch at a time."""
    carry = None
    with reading(path):
        batches = pq.ParquetFile(path).iter_batches(batch_size=ROW_GROUP, columns=columns)
    while True:
        with reading(path):
            batch = next(batches, None)
        if batch is None:
            break
        t = pa.Table.from_batches([batch])
        t = t if carry is None else pa.concat_tables([carry, t])
        item = t["item"].to_numpy()
        cuts = [0, *(np.flatnonzero(np.diff(item)) + 1).tolist(), len(item)]
        for a, b in zip(cuts[:-2], cuts[1:-1]):
            yield int(item[a]), t.slice(a, b - a)
        carry = t.slice(cuts[-2])
    if carry is not None and carry.num_rows:
        yield int(carry["item"][0].as_py()), carry


class RowGroupWriter:
    """Streams per-item tables into one Parquet file, a row group per ~ROW_GROUP rows. The file
    appears whole at close(); as a context manager, a failure leaves the old file as it was."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.file = atomic_path(path)  # the file appears whole at close(), or not at all
        self.writer = pq.ParquetWriter(self.file.__enter__(), schema, compression="zstd")
        self.schema, self.buf, self.rows = schema, [], 0

    def add(self, table: pa.Table) -> None:
        self.buf.append(conform(table, self.schema))
        self.rows += table.num_rows
        if self.rows >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.writer.write_table(pa.concat_tables(self.buf))
        self.buf, self.rows = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()
        self.file.__exit__(None, None, None)

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.writer.close()
            self.file.__exit__(*exc)  # removes the temporary file


def _read(path: Path) -> pa.Table:
    with reading(path):
        return pq.read_table(path)


def merge(folder: Path, token_schema: pa.Schema, item_schema: pa.Schema) -> int:
    """Fold the parts (and any earlier store) into tokens.parquet and items.parquet, in item
    order; returns the number of items. Memory: a few record batches of tokens, plus the items
    table."""
    parts = Parts(folder)
    names = parts.names()
    item_files = [parts.path(n, "items") for n in names]
    # Parts hold consecutive runs of items in order, so they are read one after another;
    # only an earlier store is merged beside them.
    streams = [
        itertools.chain.from_iterable(iter_item_tables(parts.path(n, "tokens")) for n in names)
    ]
    if (folder / TOKENS).is_file() and (folder / ITEMS).is_file():
        streams.insert(0, iter_item_tables(folder / TOKENS))
        item_files.insert(0, folder / ITEMS)
    items = pa.concat_tables([conform(_read(p), item_schema) for p in item_files])
    items = items.sort_by("item")
    # An item seen twice (a merge killed between its two renames) is kept once.
    ids = items["item"].to_numpy()
    items = items.filter(pa.array(np.r_[True, np.diff(ids) != 0])) if len(ids) else items
    with RowGroupWriter(folder / TOKENS, token_schema) as writer:
        last = None
        for item, table in heapq.merge(*streams, key=lambda pair: pair[0]):
            if item != last:
                writer.add(table)
            last = item
    write_table_atomic(drop_empty_segments(items), folder / ITEMS)
    parts.remove()
    return items.num_rows
