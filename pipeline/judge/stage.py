"""Judge: the file stage that fills a generation CSV's `{trait}` and `coherence` columns
through a judge (`judges.make_judge`).

A missing score (a refusal, or a request that failed after its retries) stays empty in the CSV
and is counted in the report, never a silent 0.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.atomic import write_text_atomic
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.csvio import columns, read_csv, write_csv_atomic
from pertoken.pipeline.judge.judges import CachedJudge
from pertoken.version import __version__


@dataclass
class JudgeReport:
    path: Path
    judge_model: str
    rows: int
    requests: int  # judge calls made by this run (0 when everything was cached)
    cached: int
    refused: dict[str, int] = field(default_factory=dict)  # per column: too little mass on numbers
    failed: dict[str, int] = field(default_factory=dict)  # per column: failed after retries
    seconds: float = 0.0
    identity: dict = field(default_factory=dict)  # judge_identity(): model, server, rubrics

    @property
    def missing(self) -> int:
        return sum(self.refused.values()) + sum(self.failed.values())


def judge_sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(f"{path.name}.judge.json")


def judge_csv(
    path: str | Path, judge: CachedJudge, *, out: str | Path | None = None, label: str = "judge"
) -> JudgeReport:
    """Score every row of `path` for the trait and for coherence with `judge` (make_judge);
    write `out` (default: in place) and its `.judge.json` sidecar. label names the bar."""
    start = time.perf_counter()
    with output_lock(out or path):  # two judges of one file would undo each other's work
        header, rows = read_csv(path)
        _check_trait(path, rows, judge.trait.name)
        t = judge.tally(rows, label=label)
        report = JudgeReport(
            Path(out or path), judge.judge_model, len(rows), t.requests, t.cached, t.refused,
            t.failed, identity=judge.identity,
        )  # fmt: skip
        _write(path, out, header, rows, judge.trait.name)
        report.seconds = time.perf_counter() - start
        _write_sidecar(report)
    return report


def _check_trait(path, rows, trait: str) -> None:
    other = [r["question_id"] for r in rows if not r["question_id"].startswith(f"{trait}_")]
    if other:
        raise PertokenError(
            f"{path} holds rows of another trait (question_id {other[0]!r}), not {trait!r}: "
            "pass the --trait the CSV was generated for"
        )


def _write(path, out, header, rows, trait) -> None:
    wanted = columns(trait)
    if "sample" not in header:
        wanted.remove("sample")
    extra = [c for c in header if c not in wanted]
    write_csv_atomic(out or path, wanted + extra, rows)


def _write_sidecar(report: JudgeReport) -> None:
    meta = {
        **report.identity,
        "rows": report.rows,
        "refused": report.refused,
        "failed": report.failed,
        "pertoken_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_text_atomic(judge_sidecar(report.path), json.dumps(meta, indent=2) + "\n")
