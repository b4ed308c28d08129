"""Run: generate pos, generate neg, judge both, extract, in `OUT/{model_basename}/{trait}/`.

Each stage is skipped when its output is complete, so rerunning the same command resumes.
The model is loaded only when a stage needs it.
"""

from __future__ import annotations

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
    batch_size: int = 16,
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
        stages[f"generate {pol}"] = _stage(is_complete(path, specs), lambda: generate_csv(
            model_backend(), trait=kit, out=path, polarity=pol, n_per_question=n_per_question,
            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress))

    judge_box = {}

    def judge():
        if "j" not in judge_box:
            same = judge_model == f"local:{model}"
            judge_box["j"] = make_judge(
                judge_model, base_url=base_url, concurrency=concurrency,
                backend=model_backend() if same else None, backend_name=backend)
        return judge_box["j"]

    for pol, path in csvs.items():
        stages[f"judge {pol}"] = _stage(_judged(path, judge_model), lambda: judge_csv(
            path, trait=kit, judge_model=judge_model, judge=judge(), cache=cache,
            progress=progress))

    save_dir = folder / "vectors"
    paths = vector_paths(save_dir, kit.name)
    stages["extract"] = _stage(_extracted(paths, model, threshold), lambda: extract_vectors(
        model_backend(), pos_csv=csvs["pos"], neg_csv=csvs["neg"], trait=kit.name,
        threshold=threshold, save_dir=save_dir, judge_model=judge_model))
    meta = json.loads(paths["response_avg"].with_suffix(".json").read_text())
    return RunReport(folder, paths, meta["pairs_kept"], meta["pairs_total"], stages)


def _stage(complete: bool, work) -> tuple[str, float]:
    if complete:
        return ("skipped", 0.0)
    start = time.perf_counter()
    work()
    return ("done", time.perf_counter() - start)


def _judged(path: Path, judge_model: str) -> bool:
    """Judged completely by this judge model, after the CSV was last written."""
    side = judge_sidecar(path)
    try:
        meta = json.loads(side.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    fresh = side.stat().st_mtime >= path.stat().st_mtime
    return fresh and meta.get("judge_model") == judge_model and not any(meta["failed"].values())


def _extracted(paths: dict[str, Path], model: str, threshold: float) -> bool:
    for p in paths.values():
        try:
            meta = json.loads(p.with_suffix(".json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if not p.is_file() or meta.get("threshold") != threshold:
            return False
    return True
