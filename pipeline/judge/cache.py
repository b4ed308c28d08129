"""A disk cache of judge scores keyed by (judge model, server, rubric, question, answer).

sqlite, one row per judge call, committed as each score arrives, so an interrupted judge run
resumes where it stopped and a rerun makes no requests. A refusal is cached as NULL; a
failure (no answer, a malformed one) is never cached, so a rerun asks again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
from pathlib import Path


def default_cache_path() -> Path:
    """$PERTOKEN_CACHE_DIR, else $XDG_CACHE_HOME/pertoken, else ~/.cache/pertoken; judge.sqlite."""
    root = os.environ.get("PERTOKEN_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "pertoken")
    return Path(root) / "judge.sqlite"


def cache_key(model: str, server: str, rubric: str, question: str, answer: str) -> str:
    """server: where the model runs (a base URL without credentials, or `local`)."""
    blob = json.dumps([model, server, rubric, question, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one thread at a time, but maybe not the one that opened it (see api.py)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL)")
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, float | None]:
        """The cached keys among `keys` with their scores (None = refused)."""
        found: dict[str, float | None] = {}
        unique = list(dict.fromkeys(keys))
        for b in range(0, len(unique), 500):
            chunk = unique[b : b + 500]
            marks = ",".join("?" * len(chunk))
            q = f"SELECT key, score FROM scores WHERE key IN ({marks})"
            found.update(self.db.execute(q, chunk).fetchall())
        return found

    def put(self, key: str, score: float | None) -> None:
        if score is not None and not math.isfinite(score):
            raise ValueError(f"not a score: {score}")  # sqlite would store NaN as a refusal
        self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?)", (key, score))
        self.db.commit()

    def close(self) -> None:
        self.db.close()
