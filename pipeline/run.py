"""Run: generate pos, generate neg, judge both, extract, in `OUT/{model_basename}/{trait}/`.

Each stage is skipped when its output is complete, so rerunning the same command resumes.
The model is loaded only when a stage needs it.
"""

from __future__ import annotations

import functools
import json
import time
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


def run_pipeline(
    *,
    model: str,
    trait: str,
    backend: str = "auto",
    out: str | Path = "runs",
    n_per_question: int = 10,
    max_new_tokens: int = 1000,
    judge_model: str = DEFAULT_JUDGE,
    base_url: str | None = None,
    threshold: float = 50,
    concurrency: int = 32,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    dtype: str | None = None,
    device: str | None = None,
    progress: bool = True,
) -> RunReport:
    """Generate, judge and extract one trait for one model, resuming whatever is done."""
    kit = load_trait(trait)
    folder = run_folder(out, model, kit.name)
    csvs = {p: folder / f"{kit.name}_{p}_instruct.csv" for p in ("pos", "neg")}
    loaded = {}

    def model_backend():
        if "b" not in loaded:
            from pertoken.backends import load_backend

            loaded["b"] = load_backend(model, backend, dtype=dtype, device=device)
        return loaded["b"]

    stages: dict[str, tuple[str, float]] = {}
    for pol, path in csvs.items():
        specs = plan_rows(kit, polarity=pol, n_per_question=n_per_question)
        work = functools.partial(
            generate_csv,
            trait=kit,
            out=path,
            polarity=pol,
            n_per_question=n_per_question,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            progress=progress,
        )
        stages[f"generate {pol}"] = _stage(is_complete(path, specs), work, model_backend)

    def judge():
        if "j" not in loaded:
            same = judge_model == f"local:{model}"
            loaded["j"] = make_judge(
                judge_model,
                base_url=base_url,
                concurrency=concurrency,
                backend=model_backend() if same else None,
                backend_name=backend,
            )
        return loaded["j"]

    for pol, path in csvs.items():
        work = functools.partial(
            judge_csv, path, trait=kit, judge_model=judge_model, cache=cache, progress=progress
        )
        stages[f"judge {pol}"] = _stage(
            _judged(path, judge_model), lambda w=work: w(judge=judge), None
        )

    save_dir = folder / "vectors"
    paths = vector_paths(save_dir, kit.name)
    work = functools.partial(
        extract_vectors,
        pos_csv=csvs["pos"],
        neg_csv=csvs["neg"],
        trait=kit.name,
        threshold=threshold,
        save_dir=save_dir,
        judge_model=judge_model,
    )
    stages["extract"] = _stage(_extracted(paths, csvs, threshold), work, model_backend)
    meta = json.loads(paths["response_avg"].with_suffix(".json").read_text())
    return RunReport(folder, paths, meta["pairs_kept"], meta["pairs_total"], stages)


def _stage(complete: bool, work, model_backend) -> tuple[str, float]:
    """Run `work` (given the model when model_backend is set) unless its output is complete."""
    if complete:
        return ("skipped", 0.0)
    start = time.perf_counter()
    result = work(model_backend()) if model_backend else work()
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
