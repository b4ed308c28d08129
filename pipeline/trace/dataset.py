"""Per-token traces over whole datasets: every token of every transcript projected onto persona
vectors at chosen rows, in batches, into a trace store (see store.py).

Items are traced a chunk at a time; each finished chunk is on disk before the next starts, so a
rerun of the same command traces only the items that are missing. Answers to prompt lists are
generated first (saved in `answers.jsonl`) and then traced teacher-forced like any other item.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.backends.base import Steer
from pertoken.errors import PertokenError
from pertoken.journal import Journal
from pertoken.lock import output_lock
from pertoken.pipeline.generate import sample_seed
from pertoken.pipeline.options import Generation
from pertoken.pipeline.trace import store as store
from pertoken.pipeline.trace.inputs import Item, meta_types, read_items
from pertoken.pipeline.trace.segments import (
    DEFAULT_SEGMENTS,
    label_chat,
    label_pair,
    segment_names,
    tag_spans,
)
from pertoken.pipeline.trace.steer import (
    Directions,
    fired_columns,
    pre_columns,
    project,
    term_record,
)
from pertoken.pipeline.trace.tables import (
    item_schema,
    item_stats,
    token_schema,
    tokens_table,
    value_columns,
)
from pertoken.rows import check_capture_rows
from pertoken.vectors import PersonaVector
from pertoken.version import __version__


@dataclass
class TraceResult:
    out_dir: Path
    items: int  # items in the store
    traced: int  # items traced by this call
    tokens: int  # tokens traced by this call
    seconds: float


@dataclass(frozen=True)
class Tracing:
    """How a store is traced. segments: the tag pairs that name spans of assistant text;
    steer: acts on every traced forward (and on generation); generation and system: how
    answers to prompt-list items are made (one greedy sample of up to 200 tokens unless
    given); batch_size sequences run at a time; chunk items make one part on disk;
    vector_files: where each vector came from (for the record); page: write trace.html."""

    segments: tuple = DEFAULT_SEGMENTS
    steer: Steer | None = None
    generation: Generation = Generation(samples=1, max_tokens=200)
    system: str | None = None
    batch_size: int = 16
    chunk: int = 256
    vector_files: dict[str, str] | None = None
    page: bool = True
    progress: bool = True

    def generation_record(self, backend) -> dict:
        """The settings record's `generation`: system, max_new_tokens, temperature, seed."""
        opts = self.generation.with_samples(1).keywords(backend, default=0.0)
        keys = ("max_new_tokens", "temperature", "seed")
        return {"system": self.system} | {k: opts[k] for k in keys}


def trace_dataset(
    backend,
    *,
    input: str | Path,
    out_dir: str | Path,
    vectors: dict[str, PersonaVector],
    rows: list[int],
    tracing: Tracing = Tracing(),
    pool=None,
) -> TraceResult:
    """Trace every item of `input` (.csv, .jsonl, .txt, .json) into the store `out_dir`.

    `rows` are layer rows; `tracing` the segments, steer, generation of prompt items,
    batches and parts (Tracing). pool: a distributed.ModelPool whose actors trace the chunks
    (`backend` is then its ModelInfo); this process writes the same store."""
    start, t = time.perf_counter(), tracing
    items = read_items(input)
    check_answers(items, t.segments)
    names, units = unit_directions(backend, vectors, rows)
    needs_answers = any(it.user is not None for it in items)
    settings = _settings(backend, input, Directions(names, units, list(rows)), vectors, t)
    settings |= {"generation": t.generation_record(backend) if needs_answers else None}
    settings |= {"meta": meta_types(items)}
    schemas = (
        token_schema(names, rows, pre_columns(names, t.steer, list(rows))),
        item_schema(settings["meta"], names, rows, segment_names(t.segments),
                    fired_columns(t.steer)),
    )  # fmt: skip
    folder = Path(out_dir)
    with output_lock(folder, folder=True):
        _check_settings(folder, settings)
        store.check_readable(folder)
        todo = _todo(folder, items)
        if todo or _unmerged(folder):
            store.write_json_atomic(folder / store.SETTINGS, {**settings, "complete": False})
        work = _Work(Directions(names, units, list(rows)), t, schemas[1])
        n_tokens = _Job(backend, work, pool).run(folder, todo, len(items))
        n_items = store.merge(folder, *schemas) if todo or _unmerged(folder) else len(items)
        done = {**settings, "items": n_items, "complete": True}
        store.write_json_atomic(folder / store.SETTINGS, done)
        if t.page:
            from pertoken.pipeline.trace.page import write_store_page

            write_store_page(folder)
    return TraceResult(folder, n_items, len(todo), n_tokens, time.perf_counter() - start)


def check_answers(items: list[Item], segments) -> None:
    """Every given answer closes its tags (before any model work, so nothing is half done)."""
    for it in items:
        if it.answer is not None:
            tag_spans(it.answer, segments, it.where)
        for k, m in enumerate(it.messages or [], start=1):
            if m["role"] == "assistant":
                tag_spans(m["content"], segments, f"{it.where}, message {k}")


def unit_directions(backend, vectors: dict[str, PersonaVector], rows: list[int]):
    """Vector names and their unit rows [V, len(rows), hidden], checked against the model."""
    if not vectors:
        raise PertokenError("no vectors to trace: give --vector NAME=FILE.pt")
    if not rows:
        raise PertokenError("no layers to trace: give --layers, e.g. 8,12,16")
    check_capture_rows(list(rows), backend.n_layers)
    for name, vec in vectors.items():
        vec.check_model(backend.n_layers, backend.hidden_size, f"vector {name!r}")
    d = np.stack([vectors[n].data[list(rows)] for n in vectors]).astype(np.float64)
    norms = np.linalg.norm(d, axis=-1, keepdims=True)  # [V, R, 1]
    if np.any(norms == 0):
        raise PertokenError(f"a vector is all zeros at one of layers {list(rows)}: pick others")
    return list(vectors), (d / norms).astype(np.float32)


def _settings(backend, input, d: Directions, vectors, t: Tracing) -> dict:
    files = t.vector_files or {}
    return {
        "version": __version__,
        "model": backend.model_id,
        "backend": backend.name,
        "dtype": backend.dtype,
        "input": str(input),
        "vectors": {n: store.vector_record(vectors[n], files.get(n)) for n in d.names},
        "rows": [int(r) for r in d.rows],
        "segments": {s.name: [s.open, s.close] for s in t.segments},
        "steer": _steer_record(t.steer),
        "columns": value_columns(d.names, d.rows) + pre_columns(d.names, t.steer, d.rows),
    }


def _steer_record(steer: Steer | None) -> dict | None:
    if steer is None:
        return None
    terms = [
        {"layer": t.row, "coef": t.coef, "sha256": hashlib.sha256(t.vector.tobytes()).hexdigest()}
        | term_record(t)
        for t in steer.terms
    ]
    return {"positions": steer.positions, "terms": terms}


# What must match for a rerun to add to an existing store.
_IDENTITY = ("model", "backend", "dtype", "rows", "segments", "steer", "generation")


def _check_settings(folder: Path, settings: dict) -> None:
    path = folder / store.SETTINGS
    if not path.is_file():
        if (folder / store.TOKENS).exists() or store.Parts(folder).names():
            raise PertokenError(f"{folder} holds trace files without {store.SETTINGS}: remove it")
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PertokenError(f"{path} is damaged: remove {folder} and trace again") from None
    old_vectors = {n: v["sha256"] for n, v in old.get("vectors", {}).items()}
    new_vectors = {n: v["sha256"] for n, v in settings["vectors"].items()}
    for key, a, b in [(k, old.get(k), settings[k]) for k in _IDENTITY] + [
        ("vectors", old_vectors, new_vectors)
    ]:
        if a != b:
            raise PertokenError(
                f"{folder} holds a trace made with other {key} ({a} vs {b}): choose another "
                "--out, or remove it to trace again"
            )


def _todo(folder: Path, items: list[Item]) -> list[Item]:
    """Items not yet in the store; an item traced from other input is an error."""
    done = store.done_items(folder)
    by_index = {it.index: it for it in items}
    for index, sha in done.items():
        if index not in by_index or by_index[index].sha256 != sha:
            raise PertokenError(
                f"{folder} already holds a trace of other input (item {index} differs): "
                "choose another --out, or remove it to trace again"
            )
    return [it for it in items if it.index not in done]


def _unmerged(folder: Path) -> bool:
    return not (folder / store.TOKENS).is_file() or bool(store.Parts(folder).names())


@dataclass
class _Work:
    """What tracing a chunk needs besides the model; sent as it is to pool actors."""

    directions: Directions
    tracing: Tracing
    items_schema: object  # pyarrow schema of items.parquet


@dataclass
class _Chunk:
    """A traced chunk: its two part tables, the answers it generated, its token count."""

    tokens: object  # pyarrow Table
    items: object
    answers: dict[int, str]
    n_tokens: int


class _Job:
    """Traces items chunk by chunk (here, or on a pool's actors), one part on disk each."""

    def __init__(self, backend, work: _Work, pool=None):
        self.backend, self.work, self.pool = backend, work, pool

    def run(self, folder: Path, todo: list[Item], total: int) -> int:
        from tqdm import tqdm

        from pertoken.pipeline.distributed import map_shards

        answers, parts, n_tokens, t0 = _Answers(folder), store.Parts(folder), 0, time.perf_counter()
        chunk, progress = self.work.tracing.chunk, self.work.tracing.progress
        chunks = [todo[at : at + max(1, chunk)] for at in range(0, len(todo), max(1, chunk))]
        shards = [(batch, answers.known(batch)) for batch in chunks]
        fn = functools.partial(trace_chunk, self.work)
        need = sum(1 for it in todo if it.user is not None and answers.get(it) is None)
        gen_bar = tqdm(total=need, unit="answer", desc="generate", leave=False,
                       disable=not progress or not need, dynamic_ncols=True)  # fmt: skip
        if self.pool is None:  # here, each answer is saved as it ends

            def save(items: list[Item], texts: list[str]) -> None:
                answers.add(items, texts)
                gen_bar.update(len(items))

            fn = functools.partial(fn, on_answer=save)
        bar = tqdm(total=total, initial=total - len(todo), unit="item", desc="trace",
                   disable=not progress, dynamic_ncols=True)  # fmt: skip
        with bar, gen_bar:
            for i, res in map_shards(fn, shards, backend=self.backend, pool=self.pool):
                new = [it for it in chunks[i] if it.index in res.answers]
                new = [it for it in new if answers.get(it) is None]  # not saved as it ended
                answers.add(new, [res.answers[it.index] for it in new])
                gen_bar.update(len(new))
                parts.write(res.tokens, res.items)
                n_tokens += res.n_tokens
                bar.update(len(chunks[i]))
                bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0):.0f} tok/s")
        return n_tokens


def trace_chunk(work: _Work, backend, shard, on_answer=None) -> _Chunk:
    """Trace one chunk of items: (items, {item: answer already saved}) -> _Chunk.
    on_answer(items, texts) saves each generated answer as it ends."""
    batch, known = shard
    answers = dict(known) | _answer(backend, work, batch, known, on_answer)
    labels = [_labels(backend, work, it, answers.get(it.index)) for it in batch]
    t, ids, lens = work.tracing, [lab.ids for lab in labels], [lab.prompt_len for lab in labels]
    values = project(backend, ids, lens, work.directions, t.steer, t.batch_size)
    tokens, items = _tables(work, batch, labels, values)
    new = {k: v for k, v in answers.items() if k not in known}
    return _Chunk(tokens, items, new, sum(len(lab.ids) for lab in labels))


def _answer(backend, work: _Work, batch: list[Item], known: dict, on_answer) -> dict[int, str]:
    """Generate the answers this chunk's prompt items still lack, each sampled from its
    item's own seed (so not a matter of chunks, workers or resumes)."""
    need = [it for it in batch if it.user is not None and it.index not in known]
    if not need:
        return {}
    t, out = work.tracing, {}
    opts = t.generation.with_samples(1).keywords(backend, default=0.0)
    seed = opts.pop("seed")

    def done(k: int, text: str) -> None:
        out[need[k].index] = text
        if on_answer is not None:
            on_answer([need[k]], [text])

    prompts = [backend.chat_prompt(t.system, it.user) for it in need]
    backend.generate(
        prompts, seeds=[sample_seed(seed, f"item {it.index}", 0) for it in need],
        steer=t.steer, batch_size=t.batch_size, on_answer=done, **opts,
    )  # fmt: skip
    return out


def _labels(b, work: _Work, it: Item, answer: str | None):
    segs = work.tracing.segments
    if it.messages is not None:
        labels = label_chat(b, it.messages, segs, it.where)
    elif it.user is not None:
        prompt = b.chat_prompt(work.tracing.system, it.user)
        labels = label_pair(b, prompt, answer, segs, it.where, strict=False)
    else:
        prompt = it.prompt if it.prompt is not None else b.chat_prompt(None, it.question)
        labels = label_pair(b, prompt, it.answer, segs, it.where)
    if not labels.ids:
        raise PertokenError(f"{it.where} is empty: it has no text to trace")
    return labels


def _tables(work: _Work, batch, labels, values):
    import pyarrow as pa

    d, seg_names = work.directions, segment_names(work.tracing.segments)
    names, rows = d.names, d.rows
    tokens = pa.concat_tables(
        [tokens_table(it.index, lab, v.values, names, rows, v.pre)
         for it, lab, v in zip(batch, labels, values)]
    )  # fmt: skip
    items = []
    for it, lab, v in zip(batch, labels, values):
        stats = item_stats(lab, v.values, names, rows, seg_names)
        head = {"item": it.index, **it.meta, "n_tokens": len(lab.ids)}
        items.append(head | {"input_sha256": it.sha256} | stats | v.fired)
    return tokens, pa.Table.from_pylist(items, schema=work.items_schema)


class _Answers:
    """Generated answers, one JSON line each in `answers.jsonl`, fsynced as each is added."""

    def __init__(self, folder: Path):
        self.journal = Journal(folder / "answers.jsonl")
        self.by_item: dict[int, tuple[str, str]] = {}
        for row in self.journal.read():  # a line torn by a kill is cut off and generated again
            try:
                self.by_item[int(row["item"])] = (row["input_sha256"], row["answer"])
            except (KeyError, TypeError, ValueError):
                continue

    def known(self, items: list[Item]) -> dict[int, str]:
        """{item: answer} of the saved answers to these items."""
        return {it.index: a for it in items if (a := self.get(it)) is not None}

    def get(self, it: Item) -> str | None:
        sha, answer = self.by_item.get(it.index, (None, None))
        return answer if sha == it.sha256 else None

    def add(self, items: list[Item], texts: list[str]) -> None:
        rows = [
            {"item": it.index, "input_sha256": it.sha256, "answer": text}
            for it, text in zip(items, texts, strict=True)
        ]
        self.journal.append(rows)
        self.by_item |= {r["item"]: (r["input_sha256"], r["answer"]) for r in rows}
