"""Servers on loopback for the serve tests: tiny models, two random vectors, the openai client."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pertoken.serve.app import ServeConfig
from pertoken.serve.request import Limits
from pertoken.serve.server import start
from pertoken.vectors import PersonaVector, save_vector

NAMES = ("kind", "blunt")
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
    limits = Limits(max_tokens=kw.pop("max_tokens", 64), max_rows=kw.pop("max_rows", 16))
    defaults = dict(names=[backend.model_id], vectors=vectors(), layers=list(LAYERS))
    return ServeConfig(limits=limits, **(defaults | kw))


@contextmanager
def serving(backend, *, window: float = 0.01, **kw):
    run = start(backend, config(backend, **kw), window=window)
    try:
        yield run
    finally:
        run.stop()


def client(run, key: str = "unused", **kw):
    import openai

    return openai.OpenAI(base_url=run.url + "/v1", api_key=key, max_retries=0, **kw)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
