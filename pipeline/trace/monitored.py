"""Monitored answers as a trace store: each answer `pertoken monitor` generates is one item.

An item holds the answer's tokens (role `assistant`, turn 1, segment `answer` or a tag span
such as `thinking`), with `pos` counting from the first token of the chat-templated prompt;
the prompt's own tokens are not traced, so `prompt_last` is empty. The values are the ones
read while generating, at each token's own position, as `pertoken trace` stores them.
Items carry `label` (e.g. "answer (steered)") and `question` (the user's message); SAE
features, where a hook added them, are the tokens' `features` column ([{id, act}, ...]).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from pertoken.errors import PertokenError
from pertoken.pipeline.trace import store
from pertoken.pipeline.trace.segments import (
    DEFAULT_SEGMENTS,
    TokenLabels,
    segment_names,
    tag_spans,
)
from pertoken.pipeline.trace.steer import fired_columns, pre_columns
from pertoken.pipeline.trace.tables import (
    drop_empty_segments,
    item_schema,
    item_stats,
    token_schema,
    tokens_table,
    value_columns,
)
from pertoken.version import __version__

META = {"label": "string", "question": "string"}
FEATURES = pa.list_(pa.struct([("id", pa.int32()), ("act", pa.float32())]))


def check_folder(folder: str | Path) -> None:
    """`folder` holds no store of `pertoken trace` (a monitor run replaces only its own)."""
    path = Path(folder) / store.SETTINGS
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # nothing there, or not a store's settings
    if isinstance(old, dict) and "complete" in old and old.get("command") != "monitor":
        raise PertokenError(
            f"{folder} holds a store of `pertoken trace`: give monitor another --out"
        )


def answer_labels(tokens: list[str], token_ids: list[int]) -> TokenLabels:
    """Labels of an answer's tokens: `answer`, or the tag span a token starts in."""
    starts = np.cumsum([0, *(len(t) for t in tokens[:-1])]) if tokens else np.zeros(0)
    segment = np.array(["answer"] * len(tokens), dtype=object)
    # outer spans come first, so an inner span keeps its own name
    for s, e, name in tag_spans("".join(tokens), DEFAULT_SEGMENTS, "answer", strict=False):
        segment[(starts >= s) & (starts < e)] = name
    T = len(tokens)
    return TokenLabels(list(token_ids), list(tokens), np.ones(T, np.int32), ["assistant"] * T,
                       segment.tolist(), prompt_len=0)  # fmt: skip


class Items:
    """The items of one monitor run, collected as their answers finish."""

    def __init__(self, names: list[str], layers: list[int], steer):
        self.names, self.rows, self.steer = names, [int(x) for x in layers], steer
        self.tokens: list[pa.Table] = []
        self.items: list[dict] = []

    def add(self, rec: dict, hidden: np.ndarray, prompt_len: int) -> None:
        """One answer: its record (monitor's fields) and captured states [T, R, hidden]."""
        item, labels = len(self.items), answer_labels(rec["tokens"], rec["token_ids"])
        shape = (len(labels.ids), len(self.names), len(self.rows))
        proj = np.array(rec["projections"], dtype=np.float64).reshape(shape)
        norm = np.linalg.norm(np.asarray(hidden, np.float64), axis=-1)  # [T, R]
        values = np.concatenate([proj.transpose(0, 2, 1), norm[..., None]], axis=-1)
        pre = {f"pre.{k}": np.asarray(v, np.float32) for k, v in rec.get("pre", {}).items()}
        table = tokens_table(item, labels, values, self.names, self.rows, pre)
        pos = np.arange(prompt_len, prompt_len + len(labels.ids), dtype=np.int32)
        table = table.set_column(table.schema.get_field_index("pos"), "pos", pa.array(pos))
        if "features" in rec:
            table = table.append_column(pa.field("features", FEATURES),
                                        pa.array(rec["features"], FEATURES))  # fmt: skip
        self.tokens.append(table)
        segs = segment_names(DEFAULT_SEGMENTS)
        fired = [d.get("fired") for d in rec.get("conditions", [])]
        row = {"item": item, "label": rec["label"], "question": rec["prompt"]}
        row |= {"n_tokens": len(labels.ids), "input_sha256": _sha(rec["chat_prompt"])}
        row |= item_stats(labels, values, self.names, self.rows, segs)
        self.items.append(row | dict(zip(fired_columns(self.steer), fired)))

    def write(self, folder: str | Path, settings: dict) -> Path:
        """Write the store into `folder` (replacing an earlier monitor run's); returns it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        pre = pre_columns(self.names, self.steer, self.rows)
        schema = token_schema(self.names, self.rows, pre)
        if any("features" in t.column_names for t in self.tokens):
            schema = schema.append(pa.field("features", FEATURES))
        segs = segment_names(DEFAULT_SEGMENTS)
        items_schema = item_schema(META, self.names, self.rows, segs, fired_columns(self.steer))
        tokens = pa.concat_tables([store.conform(t, schema) for t in self.tokens])
        items = pa.Table.from_pylist(self.items, schema=items_schema)
        store.write_table_atomic(tokens, folder / store.TOKENS)
        store.write_table_atomic(drop_empty_segments(items), folder / store.ITEMS)
        done = settings | {"meta": META, "items": len(self.items), "complete": True}
        store.write_json_atomic(folder / store.SETTINGS, done)
        return folder


def store_settings(backend, names, vectors, files: dict, layers, steer, steer_record) -> dict:
    """trace.json of a monitor run, in the keys `pertoken trace` writes."""
    recs = {n: store.vector_record(vectors[n], files.get(n)) for n in names}
    rows = [int(x) for x in layers]
    return {
        "version": __version__,
        "command": "monitor",
        "model": getattr(backend, "model_id", None),
        "backend": getattr(backend, "name", None),
        "dtype": getattr(backend, "dtype", None),
        "input": "monitor",
        "vectors": recs,
        "rows": rows,
        "segments": {s.name: [s.open, s.close] for s in DEFAULT_SEGMENTS},
        "steer": steer_record,
        "columns": value_columns(names, rows) + pre_columns(names, steer, rows),
    }


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
