"""Judge: the rubrics, what makes scores comparable, and the file stage that fills a generation
CSV's `{trait}` and `coherence` columns through a judge (`judges.make_judge`).

A missing score (a refusal, or a request that failed after its retries) stays empty in the CSV
and is counted in the report, never a silent 0.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pertoken import __version__
from pertoken.atomic import write_text_atomic
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.csvio import columns, read_csv, write_csv_atomic
from pertoken.traits import Trait
from pertoken.traits.kit import check_rubric_slots

if TYPE_CHECKING:
    from pertoken.pipeline.judges import CachedJudge

DEFAULT_JUDGE = "gpt-4.1-mini-2025-04-14"

COHERENCE_PROMPT = """I am evaluating the answer another language model gave. Judge its coherence \
only, independently of any other quality: whether it is helpful, correct, polite or ethical does \
not matter here.

The question it was asked:
[QUESTION START]
{question}
[QUESTION END]

Its answer:
[ANSWER START]
{answer}
[ANSWER END]

Rate the answer from 0 to 100 for how coherent it is as a reply to this question:
* 0 means the text makes no sense at all: gibberish, broken or not even valid language.
* 50 means it partly makes sense but is confused: it rambles, repeats itself, contradicts \
itself or drifts away from the question.
* 100 means it is fully coherent: it clearly understood the question and answers it in \
well-formed, consistent language, with no signs of confusion.

An answer can be wrong, rude, unethical or a refusal and still score 100 if it is coherent.
Respond with a number between 0 and 100 and nothing else."""


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


def rubrics(trait: Trait, coherence_prompt: str | None = None) -> dict[str, str]:
    """{trait name: the kit's rubric, "coherence": --coherence-prompt, the kit's, or ours}."""
    coherence = coherence_prompt or getattr(trait, "coherence_prompt", None) or COHERENCE_PROMPT
    return {trait.name: trait.eval_prompt, "coherence": coherence}


def read_rubric(path: str | Path) -> str:
    """A rubric file's text (`--coherence-prompt FILE`), with its {question} and {answer}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        msg = f"cannot read the rubric {path} ({type(e).__name__}): check the path"
        raise PertokenError(msg) from None
    check_rubric_slots(text, f"the rubric {path}")
    return text


def judge_server(judge_model: str, base_url: str | None) -> str:
    """Where scores come from: `local`, or the API's base URL without credentials."""
    from pertoken.pipeline.judge_openai import endpoint

    return "local" if judge_model.startswith("local:") else endpoint(base_url)


def judge_identity(
    trait: Trait, judge_model: str, base_url: str | None = None, coherence_prompt=None
) -> dict:
    """What makes two sets of scores comparable: judge model, server and rubrics (sha256)."""
    digests = {
        m: hashlib.sha256(r.encode("utf-8")).hexdigest()
        for m, r in rubrics(trait, coherence_prompt).items()
    }
    return {
        "judge_model": judge_model,
        "judge_base_url": judge_server(judge_model, base_url),
        "rubric_sha256": digests,
    }


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
