"""CSV files (docs/CONVENTIONS.md): columns, row keys, the one reader, the atomic writer and
scores."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from pertoken.atomic import atomic_writer
from pertoken.errors import PertokenError

BASE_COLUMNS = ("question", "prompt", "answer", "question_id")


def columns(trait: str) -> list[str]:
    """`question, prompt, answer, question_id, {trait}, coherence, sample`."""
    return [*BASE_COLUMNS, trait, "coherence", "sample"]


def read_csv(path: str | Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV; a clear error when it is missing or not a generation CSV."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"{path} does not exist: run `pertoken generate` first")
    header, rows = read_table(path)
    missing = [c for c in BASE_COLUMNS if c not in header]
    if missing:
        raise PertokenError(
            f"{path} lacks the column(s) {', '.join(missing)}: pass a CSV written by "
            "`pertoken generate` (or upstream's generation step)"
        )
    return header, rows


def read_table(path: str | Path) -> tuple[list[str], list[dict]]:
    """Header and rows of any CSV pertoken reads, as UTF-8 (a byte-order mark is skipped).

    Bytes that are not UTF-8, a row with more or fewer cells than the header, or a `sample`
    cell that is not a whole number are one error naming the file and line; `sample` is
    normalised (a pandas round trip writes 0 as `0.0`)."""
    path = Path(path)
    text = utf8_text(path)
    csv.field_size_limit(1 << 30)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    rows, line = [], reader.line_num + 1  # line: where the next record starts
    for cells in reader:
        if cells:  # blank lines hold no record, as csv.DictReader skips them
            rows.append(_row(path, line, header, cells))
        line = reader.line_num + 1
    return header, rows


def utf8_text(path: Path, kind: str = "CSV") -> str:
    """The file as text; bytes that are not UTF-8 are one error naming the file and line."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PertokenError(
            f"{path} line {line} is not UTF-8 text (byte 0x{data[e.start]:02x}): "
            f"save the {kind} as UTF-8"
        ) from None


def _row(path: Path, line: int, header: list[str], cells: list[str]) -> dict:
    if len(cells) != len(header):
        raise PertokenError(
            f"{path} line {line} has {len(cells)} cells but the header has {len(header)}: "
            "fix or remove that row (a stray comma or an unquoted line break in the text?)"
        )
    row = dict(zip(header, cells))
    if "sample" in row:
        try:
            sample = parse_sample(row["sample"])
        except ValueError:
            raise PertokenError(
                f"{path} line {line}: sample {row['sample']!r} is not a whole number "
                "0, 1, 2, ...: fix that cell or leave it empty"
            ) from None
        row["sample"] = "" if sample is None else str(sample)
    return row


def parse_sample(value) -> int | None:
    """A `sample` cell as an int (`3`, `3.0`), None when empty; ValueError when it is not a
    whole number >= 0."""
    if value is None or str(value).strip() == "":
        return None
    x = float(value)
    if not (math.isfinite(x) and x >= 0 and x == int(x)):
        raise ValueError(value)
    return int(x)


def sample_keys(rows: list[dict]) -> list[tuple[str, int]]:
    """(question_id, j) per row: j is the `sample` column, else the occurrence count."""
    seen: dict[str, int] = {}
    keys = []
    for r in rows:
        qid = r["question_id"]
        j = parse_sample(r.get("sample"))
        if j is None:
            j = seen.get(qid, 0)
        seen[qid] = max(seen.get(qid, 0), j + 1)
        keys.append((qid, j))
    return keys


def write_csv_atomic(path: str | Path, header: list[str], rows: list[dict]) -> Path:
    """Write a uniquely named temporary file and rename it, so a reader never sees half a CSV."""
    with atomic_writer(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def parse_score(value) -> float | None:
    """A judged score, or None when missing: empty, unparsable, NaN or infinite."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def format_score(score: float | None) -> str:
    """A score as a CSV cell, rounded to 4 decimals (the judge formula's 3e-15 is 0.0), or ""
    when missing (None, NaN or infinite)."""
    if score is None or not math.isfinite(score):
        return ""
    return repr(round(float(score), 4) + 0.0)  # + 0.0: no "-0.0"
