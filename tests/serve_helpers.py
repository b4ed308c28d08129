"""Servers on loopback for the serve tests: tiny models, two random vectors, the openai client."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pertoken.serve.app import ServeConfig
from pertoken.serve.request import Limits
from pertoken.serve.server import start
from pertoken.vectors import PersonaVector, save_vector

NAMES = ("kind", "blunt")
STORE_TOKENS = ["<|user|>", "Is", " it", " <b>safe</b>", "?", "<|assistant|>", "Yes", "."]
LAYERS = [2, 4]


def vectors(n_layers: int = 4, hidden: int = 64) -> dict[str, PersonaVector]:
    rng = np.random.default_rng(7)
    return {
        n: PersonaVector(rng.standard_normal((n_layers + 1, hidden)).astype(np.float32))
        for n in NAMES
    }


def vector_files(folder: Path) -> dict[str, Path]:
    return {n: save_vector(v, folder / f"{n}.pt") for n, v in vectors().items()}


def config(backend, **kw) -> ServeConfig:
    limits = Limits(max_tokens=kw.pop("max_tokens", 64), max_slots=kw.pop("max_slots", 16))
    defaults = dict(names=[backend.model_id], vectors=vectors(), layers=list(LAYERS))
    return ServeConfig(limits=limits, **(defaults | kw))


@contextmanager
def serving(backend, **kw):
    run = start(backend, config(backend, **kw))
    try:
        yield run
    finally:
        run.stop()


def client(run, key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=run.url + "/v1", api_key=key, max_retries=0, **kw)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def write_store(folder: Path) -> Path:
    """A two-item trace store in the docs/CONVENTIONS.md layout, written with pyarrow."""
    folder.mkdir(parents=True)
    n = len(STORE_TOKENS)
    roles = ["user"] * 5 + ["assistant"] * 3
    segments = ["template", "prompt", "prompt", "prompt", "prompt", "template", "answer", "answer"]
    tokens = {
        "item": [0] * n + [1] * n,
        "pos": list(range(n)) * 2,
        "token_id": list(range(n)) * 2,
        "token": STORE_TOKENS * 2,
        "turn": ([0] * 5 + [1] * 3) * 2,  # the prompt, then the answer
        "role": roles * 2,
        "segment": segments * 2,
        "proj.kind.L2": pa.array([float(i - 3) for i in range(n)] * 2, pa.float32()),
        "proj.blunt.L2": pa.array([float(3 - i) for i in range(2 * n)], pa.float32()),
        "norm.L2": pa.array([10.0] * (2 * n), pa.float32()),
    }
    pq.write_table(pa.table(tokens), folder / "tokens.parquet")
    items = {
        "item": [0, 1],
        "question_id": ["evil_0", "evil_1"],
        "evil": [12.5, 88.0],
        "proj.kind.L2.answer.mean": [0.5, 3.5],
    }
    pq.write_table(pa.table(items), folder / "items.parquet")
    return folder


@contextmanager
def arriving_together(engine, n: int):
    """The next n requests reach the engine's queue at once (so they enter the slot loop at
    the same step); yields a dict whose "peak" is the most requests the loop held at a step."""
    lock, held, seen = threading.Lock(), [], {"peak": 0}
    step = engine._step

    def gather(job) -> None:
        with lock:
            held.append(job)
            if len(held) < n:
                return
            jobs = held[:]
        with engine.cond:
            engine.pending.extend(jobs)
            engine.cond.notify()

    def counted() -> None:
        seen["peak"] = max(seen["peak"], len(engine.held))
        step()

    engine.submit, engine._step = gather, counted
    try:
        yield seen
    finally:
        del engine.submit, engine._step
