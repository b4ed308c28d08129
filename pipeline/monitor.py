"""Per-token monitoring: generate answers and project every answer token onto persona vectors.

The answers are written as a trace store (one item each; see pipeline/trace/monitored.py),
read back with `pertoken.trace.load` and shown by the store's page, trace.html.
monitor() also returns each answer as a record, plain JSON-ready Python:
    label, prompt (the user's message), system, chat_prompt, text, tokens, token_ids,
    vectors (names), layers (rows), projections [token][vector][layer] (h . v / |v|),
    cos_sim [token][vector][layer], mean [vector][layer] (mean projection over the answer),
    settings (model, backend, generation and steering options),
    and optionally features [token] -> [{"id": int, "act": float}, ...] (SAE features).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.backends.base import Steer, TokenTrace
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.live import LivePrinter
from pertoken.pipeline.options import Generation
from pertoken.pipeline.projection import project, project_rows
from pertoken.pipeline.trace.monitored import Items, check_folder, store_settings
from pertoken.pipeline.trace.page import write_store_page
from pertoken.pipeline.trace.steer import monitor_extras, term_record
from pertoken.rows import check_capture_rows
from pertoken.vectors import PersonaVector

# Called once per finished answer, before files are written, e.g. to add `features`.
TraceHook = Callable[[dict, TokenTrace], None]


@dataclass(frozen=True)
class Monitoring:
    """What a monitor run does besides generating. system: the system prompt; steer and
    compare_unsteered (each prompt also answered unsteered, same seed); out_dir: where the
    trace store and its page go (None: write nothing); live: print tokens coloured by the first
    vector at the first layer while generating, to `stream` (default stdout); settings: merged
    into each record's settings; on_trace(record, trace) may add fields such as `features`."""

    system: str | None = None
    steer: Steer | None = None
    compare_unsteered: bool = False
    out_dir: str | Path | None = "."
    live: bool = False
    stream: object = None
    settings: dict | None = None
    on_trace: TraceHook | None = None


GREEDY_200 = Generation(samples=1, max_tokens=200)  # monitor's default: greedy, 200 tokens


def monitor(
    backend,
    prompts: list[str],
    vectors: dict[str, PersonaVector],
    layers: list[int],
    generation: Generation = GREEDY_200,
    how: Monitoring = Monitoring(),
) -> list[dict]:
    """Generate an answer to each prompt (one per prompt: `generation.samples` is not used)
    and project each answer token onto `vectors` at `layers`; a trace store with an item per
    answer and its page trace.html go into `how.out_dir`. Default: greedy, 200 new tokens."""
    system, steer, out_dir, settings = how.system, how.steer, how.out_dir, how.settings
    draw = generation.with_samples(1).keywords(backend, default=0.0)
    max_new_tokens, temperature, seed = (draw[k] for k in _GENERATION)
    names, directions = _directions(backend, vectors, layers)
    if not prompts:
        raise PertokenError("no prompts to monitor: give a prompt or --prompts FILE")
    printer = (
        LivePrinter(lambda h: project(h[0], directions[0, 0]), stream=how.stream)
        if how.live
        else None
    )
    runs = _runs(prompts, steer, how.compare_unsteered)
    base = _settings(backend, max_new_tokens, temperature, seed, settings)
    store = store_settings(backend, names, vectors, (settings or {}).get("vector_files") or {},
                           layers, steer, _steer_settings(steer)["steer"])  # fmt: skip
    store["generation"] = {"system": system, **{k: base[k] for k in _GENERATION}}
    one = _Answer(backend, names, directions, list(layers), system, base, how.on_trace)
    records: list[dict] = []
    items = Items(names, layers, steer)
    with ExitStack() as stack:
        if out_dir is not None:
            check_folder(out_dir)
            stack.enter_context(output_lock(out_dir, folder=True))
        try:
            for label, user, run_steer in runs:
                if printer and len(runs) > 1:
                    printer.line(f"\n== {label}")
                rec, hidden = one(label, user, run_steer, printer)
                items.add(rec, hidden, len(backend.encode(rec["chat_prompt"])))
                records.append(rec)
                if printer:
                    printer.line()
                    printer.line(_mean_line(rec))
        finally:
            # An interrupted run still keeps the answers it finished.
            if out_dir is not None and records:
                write_outputs(items, records, store, out_dir)
    return records


class _Answer:
    """Generates and projects one answer: its record and captured states [T, R, hidden]."""

    def __init__(self, backend, names, directions, layers, system, settings, on_trace):
        self.backend, self.names, self.directions = backend, names, directions
        self.layers, self.system, self.settings = layers, system, settings
        self.on_trace = on_trace

    def __call__(self, label: str, user: str, steer: Steer | None, printer):
        b, s = self.backend, self.settings
        chat = b.chat_prompt(self.system, user)
        trace = b.trace(chat, rows=self.layers, max_new_tokens=s["max_new_tokens"], steer=steer,
                        temperature=s["temperature"], seed=s["seed"], on_token=printer)  # fmt: skip
        rec = trace_record(trace, names=self.names, directions=self.directions, layers=self.layers)
        rec.update(label=label, prompt=user, system=self.system, chat_prompt=chat)
        rec["settings"] = {**s, **_steer_settings(steer)}
        rec |= monitor_extras(b, chat, trace, steer, self.names, self.directions, self.layers)
        if self.on_trace:
            self.on_trace(rec, trace)
        shape = (len(trace.tokens), len(self.layers), self.directions.shape[-1])
        return rec, np.asarray(trace.hidden).reshape(shape)


def trace_record(
    trace: TokenTrace, *, names: list[str], directions: np.ndarray, layers: list[int]
) -> dict:
    """The JSON-ready projections of one TokenTrace; directions is [K, L, hidden]."""
    if list(trace.rows) != list(layers):
        raise PertokenError(f"backend returned rows {trace.rows}, asked for {layers}")
    shape = (len(trace.tokens), len(layers), directions.shape[-1])  # [T, L, hidden]
    hidden = np.asarray(trace.hidden, np.float32).reshape(shape)
    proj, cos = project_rows(hidden, directions)  # [T, K, L] each
    mean = proj.mean(axis=0) if len(proj) else np.zeros(directions.shape[:2])
    return {
        "text": trace.text,
        "tokens": list(trace.tokens),
        "token_ids": [int(t) for t in trace.token_ids],
        "vectors": list(names),
        "layers": [int(x) for x in layers],
        "projections": _json_floats(proj),
        "cos_sim": _json_floats(cos),
        "mean": _json_floats(mean),
    }


def _json_floats(a: np.ndarray) -> list:
    """Nested lists of floats, with null where a value is not finite (JSON has no NaN)."""
    a = np.asarray(a, np.float64)
    if np.all(np.isfinite(a)):
        return a.tolist()
    return np.where(np.isfinite(a), a, None).tolist()


def write_outputs(items: Items, records: list[dict], settings: dict, out_dir) -> Path:
    """Write the store of `items` and its page into out_dir; returns the page's path."""
    # what hooks and the command add to a record's settings (sae, steer_files, ...)
    extra = {k: v for k, v in records[0]["settings"].items() if k not in _OWN_SETTINGS}
    items.write(out_dir, settings | extra)
    first = records[0]["prompt"] or ""
    title = f"pertoken monitor: {first[:60]}" if first else "pertoken monitor"
    return write_store_page(out_dir, title=title)


def _directions(backend, vectors: dict[str, PersonaVector], layers: list[int]):
    """Vector names and their rows at `layers` ([K, L, hidden] float32), checked for the model."""
    if not vectors:
        raise PertokenError("no vectors to monitor: give --vector NAME=FILE.pt")
    if not layers:
        raise PertokenError("no layers to monitor: give --layers, e.g. 16,20")
    check_capture_rows(list(layers), backend.n_layers)
    for name, vec in vectors.items():
        vec.check_model(backend.n_layers, backend.hidden_size, f"vector {name!r}")
        vec.check_nonzero(list(layers), f"vector {name!r}")
    names = list(vectors)
    return names, np.stack([vectors[n].data[list(layers)] for n in names]).astype(np.float32)


def _runs(prompts: list[str], steer: Steer | None, compare: bool) -> list[tuple]:
    """(label, user prompt, steer) for each answer to generate."""
    runs = []
    for i, p in enumerate(prompts):
        name = f"prompt {i + 1}" if len(prompts) > 1 else "answer"
        if steer is not None and compare:
            runs += [(f"{name} (unsteered)", p, None), (f"{name} (steered)", p, steer)]
        else:
            runs.append((name + (" (steered)" if steer is not None else ""), p, steer))
    return runs


_GENERATION = ("max_new_tokens", "temperature", "seed")
_OWN_SETTINGS = ("model", "backend", "dtype", "steer", "vector_files", *_GENERATION)


def _settings(backend, max_new_tokens, temperature, seed, extra: dict | None) -> dict:
    return {
        "model": getattr(backend, "model_id", None),
        "backend": getattr(backend, "name", None),
        "dtype": getattr(backend, "dtype", None),
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "seed": seed,
        **(extra or {}),
    }


def _steer_settings(steer: Steer | None) -> dict:
    if steer is None:
        return {"steer": None}
    terms = [
        {"layer": t.row, "coef": t.coef, "norm": float(np.linalg.norm(t.vector))} | term_record(t)
        for t in steer.terms
    ]
    return {"steer": {"positions": steer.positions, "terms": terms}}


def _mean_line(rec: dict) -> str:
    parts = [
        f"{v}@{layer}={rec['mean'][k][j]:+.3f}"
        for k, v in enumerate(rec["vectors"])
        for j, layer in enumerate(rec["layers"])
    ]
    return "mean projection: " + "  ".join(parts)
