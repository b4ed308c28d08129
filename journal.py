"""A resumable record of finished work: one JSON object per line, each append flushed and fsynced.

A process killed mid-append leaves at most one torn last line; reading cuts it off (so the next
append starts on a line of its own) and skips any line that is not a JSON object, whose work is
then simply done again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


class Journal:
    """`read()` the records saved so far; `append(records)` saves more, durably, in one write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def read(self) -> list[dict]:
        """Every whole record, in order; a torn last line is cut off the file."""
        if not self.path.is_file():
            return []
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            os.truncate(self.path, end)
        records = []
        for line in data[:end].splitlines():
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # a line damaged by a crash: its work is done again
            if isinstance(record, dict):
                records.append(record)
        return records

    def append(self, records: Iterable[dict]) -> None:
        """Add `records` at the end, on disk when this returns."""
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
