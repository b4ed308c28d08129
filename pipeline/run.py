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
from pertoken.pipeline.judge.stage import judge_csv, judge_sidecar
from pertoken.pipeline.options import Extraction, Generation, JudgeSettings, ModelChoice
from pertoken.pipeline.vet.card import report_paths
from pertoken.pipeline.vet.stage import Vetting, vet_vector
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


StageHook = Callable[[str, str, float], None]  # (stage, status, seconds)


@dataclass(frozen=True)
class Watch:
    """What a run shows as it goes: progress bars, and on_stage(stage, status, seconds) as
    each stage ends."""

    progress: bool = True
    on_stage: StageHook | None = None


def run_pipeline(
    model: ModelChoice,
    trait: str,
    *,
    out: str | Path = "runs",
    generation: Generation = Generation(),
    judging: JudgeSettings = JudgeSettings(),
    extraction: Extraction = Extraction(),
    watch: Watch = Watch(),
) -> RunReport:
    """Generate, judge and extract one trait for one model, resuming whatever is done.

    model: which model and how it loads; trait: kit name or file; out: root of the run
    folders. Defaults: 10 samples per question, 1000 new tokens, temperature 1 (plain
    sampler, seed 0; greedy with one sample), the default judge, threshold 50, method
    mean_diff (probe adds `{trait}_response_avg_probe.pt`, which is then vetted).
    """
    return _Run(model, trait, out, (generation, judging, extraction), watch).run()


class _Run:
    """One run folder; the model and the judge are loaded only when a stage needs them."""

    def __init__(self, model: ModelChoice, trait: str, out, settings, watch: Watch):
        self.choice, self.kit, self.watch = model, load_trait(trait), watch
        self.generation, judging, self.extraction = settings
        self.folder = run_folder(out, model.model, self.kit.name)
        self.csvs = {
            p: inside(self.folder, f"{self.kit.name}_{p}_instruct.csv") for p in POLARITIES
        }
        self.paths = vector_paths(self.folder / "vectors", self.kit.name)
        if self.extraction.method == "probe":
            self.paths["probe"] = probe_path(self.folder / "vectors", self.kit.name)
        self.report = report_paths(self.folder / "vectors", self.kit.name)["json"]
        self._backend = None
        # a `local:` judge of the same model reuses it
        self.judge = make_judge(
            self.kit, judging, progress=watch.progress, model=model, backend=self.backend
        )

    def run(self) -> RunReport:
        with output_lock(self.folder, folder=True):  # one process per run folder
            self.check_backend()
            return self._run()

    def check_backend(self) -> None:
        """A folder holding another backend's run is refused (its answers and vectors are that
        backend's); a fresh folder records which backend fills it, in run.json."""
        from pertoken.backends import choose

        name, record = choose(self.choice.backend).backend, self.folder / RUN_RECORD
        held = recorded_backend(self.folder, self.paths["response_avg"], self.report)
        if held is not None and held != name:
            raise PertokenError(
                f"{self.folder} holds a run made with the {held} backend, and this run uses "
                f"{name}: pass --out elsewhere (e.g. --out runs-{name}) to keep both, or "
                f"--backend {held} to resume that run"
            )
        if not record.is_file():
            write_text_atomic(record, json.dumps({"backend": name, "model": self.choice.model}))

    def _run(self) -> RunReport:
        on_stage, threshold, stages = self.watch.on_stage, self.extraction.threshold, {}
        generated = {pol: self.generated(pol) for pol in POLARITIES}
        if not all(generated.values()) or not all(map(self.judged, POLARITIES)):
            self.judge.check()  # before the model loads, not hours later

        def stage(name: str, complete: bool, work, *args) -> None:
            stages[name] = _stage(complete, work, *args)
            if on_stage is not None:
                on_stage(name, *stages[name])

        for pol in POLARITIES:
            stage(f"generate {pol}", generated[pol], self.generate, pol)
        for pol in POLARITIES:
            stage(f"judge {pol}", self.judged(pol), self.judge_file, pol)
        stage("extract", _extracted(self.paths, self.csvs, threshold), self.extract)
        stage("vet", _vetted(self.report, self.vetted_vector()), self.vet)
        meta = json.loads(self.paths["response_avg"].with_suffix(".json").read_text())
        report = self.report if _vetted(self.report, self.vetted_vector()) else None
        kept, total = meta["pairs_kept"], meta["pairs_total"]
        return RunReport(self.folder, self.paths, kept, total, stages, report, self._backend)

    def vetted_vector(self) -> Path:
        return self.paths.get("probe", self.paths["response_avg"])

    def generated(self, pol: str) -> bool:
        specs = plan_rows(self.kit, polarity=pol, n_per_question=self.generation.samples)
        return is_complete(self.csvs[pol], specs)

    def judged(self, pol: str) -> bool:
        return _judged(self.csvs[pol], self.judge.identity)

    def backend(self):
        if self._backend is None:
            self._backend = self.choice.load()
        return self._backend

    def generate(self, pol: str):
        return generate_csv(
            self.backend(), self.kit, self.csvs[pol], self.generation,
            polarity=pol, progress=self.watch.progress,
        )  # fmt: skip

    def judge_file(self, pol: str):
        return judge_csv(self.csvs[pol], self.judge, label=f"judge {pol}")

    def extract(self):
        return extract_vectors(
            self.backend(), pos_csv=self.csvs["pos"], neg_csv=self.csvs["neg"],
            trait=self.kit.name, save_dir=self.paths["prompt_avg"].parent,
            extraction=self.extraction, progress=self.watch.progress,
        )  # fmt: skip

    def vet(self):
        """The report card; a vet that cannot be made is a stage status, not an error, since
        the vectors are done."""
        try:
            vet_vector(
                self.vetted_vector(),
                pos_csv=self.csvs["pos"],
                neg_csv=self.csvs["neg"],
                backend=self.backend,
                model=self.choice.model,
                vetting=Vetting(trait=self.kit.name),
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
