"""Run: generate pos, generate neg, judge both, extract, in `OUT/{model_basename}/{trait}/`.

Each stage is skipped when its output is complete, so rerunning the same command resumes.
The model is loaded only when a stage needs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.pipeline.extract import extract_vectors, vector_paths
from pertoken.pipeline.generate import generate_csv, is_complete, plan_rows
from pertoken.pipeline.judge import DEFAULT_JUDGE, judge_csv, judge_sidecar, make_judge
from pertoken.traits import load_trait

DEFAULT_MODELS = {"torch": "google/gemma-2-9b-it", "mlx": "mlx-community/gemma-2-9b-it-4bit"}


@dataclass
class RunReport:
    folder: Path
    vectors: dict[str, Path]
    pairs_kept: int
    pairs_total: int
    stages: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (status, s)


def default_model(backend: str = "auto") -> str:
    """The seed study's model for the resolved backend."""
    from pertoken.backends import resolve

    return DEFAULT_MODELS[resolve(backend)]


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
    temperature: float | None = None  # 1.0, or 0 when n_per_question is 1
    sampler: str = "plain"
    seed: int = 0
    judge_model: str = DEFAULT_JUDGE
    base_url: str | None = None
    threshold: float = 50
    concurrency: int = 32
    batch_size: int | None = None
    cache: str | Path | None = None
    dtype: str | None = None
    device: str | None = None
    progress: bool = True
    on_stage: Callable[[str, str, float], None] | None = None  # (stage, status, seconds)


def run_pipeline(**options) -> RunReport:
    """Generate, judge and extract one trait for one model, resuming whatever is done.

    Options (keyword-only) are RunOptions' fields: model and trait are required; the others
    default to 10 samples per question, 1000 new tokens, the default judge, threshold 50.
    on_stage(stage, status, seconds) is called as each stage ends.
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

        def stage(name: str, complete: bool, work, *args) -> None:
            stages[name] = _stage(complete, work, *args)
            if o.on_stage is not None:
                o.on_stage(name, *stages[name])

        for pol, path in self.csvs.items():
            specs = plan_rows(self.kit, polarity=pol, n_per_question=o.n_per_question)
            stage(f"generate {pol}", is_complete(path, specs), self.generate, pol)
        for pol, path in self.csvs.items():
            stage(f"judge {pol}", _judged(path, o.judge_model), self.judge, pol)
        stage("extract", _extracted(self.paths, self.csvs, o.threshold), self.extract)
        meta = json.loads(self.paths["response_avg"].with_suffix(".json").read_text())
        return RunReport(self.folder, self.paths, meta["pairs_kept"], meta["pairs_total"], stages)

    def backend(self):
        if self._backend is None:
            from pertoken.backends import load_backend

            o = self.opts
            self._backend = load_backend(o.model, o.backend, dtype=o.dtype, device=o.device)
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
            temperature=o.temperature,
            sampler=o.sampler,
            batch_size=o.batch_size,
            seed=o.seed,
            progress=o.progress,
            label=f"generate {pol}",
        )

    def judge(self, pol: str):
        o = self.opts
        return judge_csv(
            self.csvs[pol],
            trait=self.kit,
            judge_model=o.judge_model,
            judge=self.make_judge,
            cache=o.cache,
            progress=o.progress,
            label=f"judge {pol}",
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
            progress=o.progress,
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
