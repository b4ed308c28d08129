"""Run: generate pos, generate neg, judge both, extract, in `OUT/{model_basename}/{trait}/`.

Each stage is skipped when its output is complete, so rerunning the same command resumes.
The model is loaded only when a stage needs it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.backends import default_model as default_model  # `run` without --model
from pertoken.pipeline.extract import extract_vectors, vector_paths
from pertoken.pipeline.generate import generate_csv, is_complete, plan_rows
from pertoken.pipeline.judge import DEFAULT_JUDGE, judge_csv, judge_sidecar, make_judge
from pertoken.traits import load_trait


@dataclass
class RunReport:
    folder: Path
    vectors: dict[str, Path]
    pairs_kept: int
    pairs_total: int
    stages: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (status, s)
    backend: object | None = None  # the model, when a stage loaded it


def run_folder(out: str | Path, model: str, trait: str) -> Path:
    return Path(out) / Path(model.rstrip("/")).name / trait


@dataclass
class RunOptions:
    model: str
    trait: str
    backend: str = "auto"
    out: str | Path = "runs"
    n_per_question: int = 10
    max_new_tokens: int = 1000
    judge_model: str = DEFAULT_JUDGE
    base_url: str | None = None
    threshold: float = 50
    concurrency: int = 32
    batch_size: int | None = None
    cache: str | Path | None = None
    dtype: str | None = None
    device: str | None = None
    compile: bool = False  # torch: the compiled decode step
    progress: bool = True


def run_pipeline(**options) -> RunReport:
    """Generate, judge and extract one trait for one model, resuming whatever is done.

    Options (keyword-only) are RunOptions' fields: model and trait are required; the others
    default to 10 samples per question, 1000 new tokens, the default judge, threshold 50.
    """
    return _Run(RunOptions(**options)).run()


class _Run:
    """One run folder; the model and the judge are loaded only when a stage needs them."""

    def __init__(self, opts: RunOptions):
        self.opts, self.kit = opts, load_trait(opts.trait)
        self.folder = run_folder(opts.out, opts.model, self.kit.name)
        self.csvs = {p: self.folder / f"{self.kit.name}_{p}_instruct.csv" for p in ("pos", "neg")}
        self.paths = vector_paths(self.folder / "vectors", self.kit.name)
        self._backend = self._judge = None

    def run(self) -> RunReport:
        o, stages = self.opts, {}
        for pol, path in self.csvs.items():
            specs = plan_rows(self.kit, polarity=pol, n_per_question=o.n_per_question)
            stages[f"generate {pol}"] = _stage(is_complete(path, specs), self.generate, pol)
        for pol, path in self.csvs.items():
            stages[f"judge {pol}"] = _stage(_judged(path, o.judge_model), self.judge, path)
        done = _extracted(self.paths, self.csvs, o.threshold)
        stages["extract"] = _stage(done, self.extract)
        meta = json.loads(self.paths["response_avg"].with_suffix(".json").read_text())
        kept, total = meta["pairs_kept"], meta["pairs_total"]
        return RunReport(self.folder, self.paths, kept, total, stages, self._backend)

    def backend(self):
        if self._backend is None:
            from pertoken.backends import load_backend

            o = self.opts
            self._backend = load_backend(
                o.model, o.backend, dtype=o.dtype, device=o.device, compile=o.compile
            )
        return self._backend

    def make_judge(self):
        if self._judge is None:
            o = self.opts
            same = o.judge_model == f"local:{o.model}"  # judge with the model already loaded
            self._judge = make_judge(
                o.judge_model,
                base_url=o.base_url,
                concurrency=o.concurrency,
                backend=self.backend() if same else None,
                backend_name=o.backend,
            )
        return self._judge

    def generate(self, pol: str):
        o = self.opts
        return generate_csv(
            self.backend(),
            trait=self.kit,
            out=self.csvs[pol],
            polarity=pol,
            n_per_question=o.n_per_question,
            max_new_tokens=o.max_new_tokens,
            batch_size=o.batch_size,
            progress=o.progress,
        )

    def judge(self, path: Path):
        o = self.opts
        return judge_csv(
            path,
            trait=self.kit,
            judge_model=o.judge_model,
            judge=self.make_judge,
            cache=o.cache,
            progress=o.progress,
        )

    def extract(self):
        o = self.opts
        return extract_vectors(
            self.backend(),
            pos_csv=self.csvs["pos"],
            neg_csv=self.csvs["neg"],
            trait=self.kit.name,
            threshold=o.threshold,
            save_dir=self.paths["prompt_avg"].parent,
            judge_model=o.judge_model,
        )


def _stage(complete: bool, work, *args) -> tuple[str, float]:
    """(status, seconds) after running `work(*args)`, unless its output is already complete."""
    if complete:
        return ("skipped", 0.0)
    start = time.perf_counter()
    result = work(*args)
    missing = getattr(result, "missing", 0)  # judge scores that stayed empty
    status = f"done, {missing} scores missing" if missing else "done"
    return (status, time.perf_counter() - start)


def _judged(path: Path, judge_model: str) -> bool:
    """Judged completely by this judge model, after the CSV was last written."""
    side = judge_sidecar(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    fresh = side.stat().st_mtime >= path.stat().st_mtime
    return fresh and meta.get("judge_model") == judge_model and not any(meta["failed"].values())


def _extracted(paths: dict[str, Path], csvs: dict[str, Path], threshold: float) -> bool:
    """All three vectors exist, for this threshold, newer than both CSVs."""
    newest = max(p.stat().st_mtime for p in csvs.values())
    for p in paths.values():
        try:
            meta = json.loads(p.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if not p.is_file() or meta.get("threshold") != threshold or p.stat().st_mtime < newest:
            return False
    return True
