"""Run: generate pos, generate neg, judge both, extract, vet, in `OUT/{model_basename}/{trait}/`.

Each stage is skipped when its output is complete, so rerunning the same command resumes.
The model is loaded only when a stage needs it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.atomic import write_text_atomic
from pertoken.backends import default_model as default_model  # `run` without --model
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.paths import inside, model_basename, path_name
from pertoken.pipeline.extract import extract_vectors, probe_path, vector_paths
from pertoken.pipeline.generate import POLARITIES, generate_csv, is_complete, plan_rows
from pertoken.pipeline.judge.judges import make_judge
from pertoken.pipeline.judge.rubrics import DEFAULT_JUDGE
from pertoken.pipeline.judge.stage import judge_csv, judge_sidecar
from pertoken.pipeline.vet.card import report_paths
from pertoken.pipeline.vet.stage import vet_vector
from pertoken.traits import load_trait


@dataclass
class RunReport:
    folder: Path
    vectors: dict[str, Path]
    pairs_kept: int
    pairs_total: int
    stages: dict[str, tuple[str, float]] = field(default_factory=dict)  # name -> (status, s)
    report: Path | None = None  # the vetted vector's report card (JSON), when vet succeeded
    backend: object | None = None  # the model, when a stage loaded it


def run_folder(out: str | Path, model: str, trait: str) -> Path:
    """`out/{model basename}/{trait}`, never outside `out` (names are checked)."""
    return inside(out, model_basename(model), path_name(trait, "trait name"))


@dataclass
class RunOptions:
    """run_pipeline's options, as it documents them."""

    model: str
    trait: str
    backend: str
    out: str | Path
    n_per_question: int
    max_new_tokens: int
    temperature: float | None  # 1.0, or 0 when n_per_question is 1
    sampler: str
    seed: int
    judge_model: str
    base_url: str | None
    threshold: float
    concurrency: int
    batch_size: int | None
    cache: str | Path | None
    dtype: str | None
    device: str | None
    compile: bool  # torch: the compiled decode step
    progress: bool
    method: str
    coherence_prompt: str | None
    max_consecutive_failures: int
    on_stage: Callable[[str, str, float], None] | None  # (stage, status, seconds)


def run_pipeline(
    *,
    model: str,
    trait: str,
    backend: str = "auto",
    out: str | Path = "runs",
    n_per_question: int = 10,
    max_new_tokens: int = 1000,
    temperature: float | None = None,
    sampler: str = "plain",
    seed: int = 0,
    judge_model: str = DEFAULT_JUDGE,
    base_url: str | None = None,
    threshold: float = 50,
    concurrency: int = 32,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
    method: str = "mean_diff",
    coherence_prompt: str | None = None,
    max_consecutive_failures: int = 8,
    on_stage: Callable[[str, str, float], None] | None = None,
) -> RunReport:
    """Generate, judge and extract one trait for one model, resuming whatever is done.

    model: hub id or folder; trait: kit name or file; out: root of the run folders. Defaults:
    10 samples per question, 1000 new tokens, temperature 1 (plain sampler, seed 0), the
    default judge (judge_model, base_url, concurrency, max_consecutive_failures, cache,
    coherence_prompt: rubric text, default the kit's or the judge's own), threshold 50, method
    mean_diff (probe adds `{trait}_response_avg_probe.pt`, which is then vetted). compile: the
    torch backend's compiled decode step. on_stage(stage, status, seconds) is called as each
    stage ends.
    """
    return _Run(RunOptions(**locals())).run()


class _Run:
    """One run folder; the model and the judge are loaded only when a stage needs them."""

    def __init__(self, opts: RunOptions):
        self.opts, self.kit = opts, load_trait(opts.trait)
        self.folder = run_folder(opts.out, opts.model, self.kit.name)
        self.csvs = {
            p: inside(self.folder, f"{self.kit.name}_{p}_instruct.csv") for p in POLARITIES
        }
        self.paths = vector_paths(self.folder / "vectors", self.kit.name)
        if opts.method == "probe":
            self.paths["probe"] = probe_path(self.folder / "vectors", self.kit.name)
        self.report = report_paths(self.folder / "vectors", self.kit.name)["json"]
        self._backend = None
        self.judge = make_judge(
            self.kit,
            judge_model=opts.judge_model,
            base_url=opts.base_url,
            concurrency=opts.concurrency,
            max_consecutive_failures=opts.max_consecutive_failures,
            coherence_prompt=opts.coherence_prompt,
            cache=opts.cache,
            progress=opts.progress,
            model=opts.model,  # a `local:` judge of the same model reuses it
            backend=self.backend,
            backend_name=opts.backend,
        )

    def run(self) -> RunReport:
        with output_lock(self.folder, folder=True):  # one process per run folder
            self.check_backend()
            return self._run()

    def check_backend(self) -> None:
        """A folder holding another backend's run is refused (its answers and vectors are that
        backend's); a fresh folder records which backend fills it, in run.json."""
        from pertoken.backends import choose

        name, record = choose(self.opts.backend).backend, self.folder / RUN_RECORD
        held = recorded_backend(self.folder, self.paths["response_avg"], self.report)
        if held is not None and held != name:
            raise PertokenError(
                f"{self.folder} holds a run made with the {held} backend, and this run uses "
                f"{name}: pass --out elsewhere (e.g. --out runs-{name}) to keep both, or "
                f"--backend {held} to resume that run"
            )
        if not record.is_file():
            write_text_atomic(record, json.dumps({"backend": name, "model": self.opts.model}))

    def _run(self) -> RunReport:
        o, stages = self.opts, {}
        generated = {pol: self.generated(pol) for pol in POLARITIES}
        if not all(generated.values()) or not all(map(self.judged, POLARITIES)):
            self.judge.check()  # before the model loads, not hours later

        def stage(name: str, complete: bool, work, *args) -> None:
            stages[name] = _stage(complete, work, *args)
            if o.on_stage is not None:
                o.on_stage(name, *stages[name])

        for pol in POLARITIES:
            stage(f"generate {pol}", generated[pol], self.generate, pol)
        for pol in POLARITIES:
            stage(f"judge {pol}", self.judged(pol), self.judge_file, pol)
        stage("extract", _extracted(self.paths, self.csvs, o.threshold), self.extract)
        stage("vet", _vetted(self.report, self.vetted_vector()), self.vet)
        meta = json.loads(self.paths["response_avg"].with_suffix(".json").read_text())
        report = self.report if _vetted(self.report, self.vetted_vector()) else None
        kept, total = meta["pairs_kept"], meta["pairs_total"]
        return RunReport(self.folder, self.paths, kept, total, stages, report, self._backend)

    def vetted_vector(self) -> Path:
        return self.paths.get("probe", self.paths["response_avg"])

    def generated(self, pol: str) -> bool:
        specs = plan_rows(self.kit, polarity=pol, n_per_question=self.opts.n_per_question)
        return is_complete(self.csvs[pol], specs)

    def judged(self, pol: str) -> bool:
        return _judged(self.csvs[pol], self.judge.identity)

    def backend(self):
        if self._backend is None:
            from pertoken.backends import load_backend

            o = self.opts
            self._backend = load_backend(
                o.model, o.backend, dtype=o.dtype, device=o.device, compile=o.compile
            )
        return self._backend

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

    def judge_file(self, pol: str):
        return judge_csv(self.csvs[pol], self.judge, label=f"judge {pol}")

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
            method=o.method,
            progress=o.progress,
        )

    def vet(self):
        """The report card; a vet that cannot be made is a stage status, not an error, since
        the vectors are done."""
        try:
            vet_vector(
                self.vetted_vector(),
                pos_csv=self.csvs["pos"],
                neg_csv=self.csvs["neg"],
                backend=self.backend,
                model=self.opts.model,
                trait=self.kit.name,
            )
        except PertokenError as e:
            return _Status(f"no report: {e}")


@dataclass
class _Status:
    status: str


RUN_RECORD = "run.json"  # {"backend", "model"} of the run that fills the folder


def recorded_backend(folder: Path, vector: Path, report: Path) -> str | None:
    """The backend recorded in run.json, else in the vector's or report card's sidecar."""
    for path in (folder / RUN_RECORD, vector.with_suffix(".json"), report):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            continue
        data = data.get("meta", data) if isinstance(data, dict) else {}
        if isinstance(data, dict) and isinstance(data.get("backend"), str):
            return data["backend"]
    return None


def _stage(complete: bool, work, *args) -> tuple[str, float]:
    """(status, seconds) after running `work(*args)`, unless its output is already complete."""
    if complete:
        return ("skipped", 0.0)
    start = time.perf_counter()
    result = work(*args)
    missing = getattr(result, "missing", 0)  # judge scores that stayed empty
    status = f"done, {missing} scores missing" if missing else "done"
    status = result.status if isinstance(result, _Status) else status
    return (status, time.perf_counter() - start)


def _judged(path: Path, identity: dict) -> bool:
    """Judged completely by this judge (model, server, rubrics), after the CSV was last written."""
    side = judge_sidecar(path)
    try:
        meta = json.loads(side.read_text())
        fresh = side.stat().st_mtime >= path.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return False
    same = all(meta.get(k) == v for k, v in identity.items())
    return fresh and same and not any(meta.get("failed", {"?": 1}).values())


def _vetted(report: Path, vector: Path) -> bool:
    """The report card exists and is newer than the vector it vets."""
    return (
        report.is_file() and vector.is_file() and report.stat().st_mtime >= vector.stat().st_mtime
    )


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
