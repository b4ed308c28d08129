"""A disk cache of judge scores keyed by (judge model, rubric, question, answer).

sqlite, one row per judge call, committed as each score arrives, so an interrupted judge run
resumes where it stopped and a rerun makes no requests. A refusal is cached as NULL.
"""

from __future__ import annotations

import hashlib
import json
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


def cache_key(model: str, rubric: str, question: str, answer: str) -> str:
    blob = json.dumps([model, rubric, question, answer], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_cache_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # one thread at a time, but maybe not the one that opened it (see judge_openai)
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
        self.db.execute("INSERT OR REPLACE INTO scores VALUES (?, ?)", (key, score))
        self.db.commit()

    def close(self) -> None:
        self.db.close()
