"""Sweep: every (model, trait) job of a plan (plan.py) run as `pertoken run` runs it,
then its optional eval grid and traces, into `OUT/{model}/{trait}/`; then `OUT/sweep.csv`.

Without Ray the jobs run one after another here. With Ray each job is one task asking for
the GPUs its model needs, and tasks run as the cluster has room; the judge's requests in
flight are limited across all of them by one SharedLimit. A job that fails is reported in
sweep.csv and the others go on; every stage resumes on rerun, so a rerun redoes nothing done.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from pertoken.atomic import write_text_atomic
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.paths import inside, model_basename
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.judge.api import check_endpoint
from pertoken.pipeline.options import Extraction, Generation, JudgeSettings, ModelChoice, from_flat
from pertoken.pipeline.sweep.plan import Job, Plan

COLUMNS = ["model", "trait", "state", "pairs_kept", "pairs_total", "suggested_row",
           "heldout_auroc", "best_eval", "seconds", "ran", "folder"]  # fmt: skip
HEADROOM = 1.2  # a GPU holds the weights plus the KV cache and activations


@dataclass
class JobResult:
    model: str
    trait: str
    state: str  # "done", or "failed: why"
    folder: str = ""
    pairs_kept: int | None = None
    pairs_total: int | None = None
    suggested_row: int | None = None
    heldout_auroc: float | None = None
    best_eval: str = ""
    seconds: float = 0.0
    ran: list[str] = field(default_factory=list)  # stages run by this call (others skipped)

    def row(self) -> dict:
        auroc = "" if self.heldout_auroc is None else f"{self.heldout_auroc:.3f}"
        return asdict(self) | {
            "model": model_basename(self.model),
            "heldout_auroc": auroc,
            "seconds": f"{self.seconds:.1f}",
            "ran": " ".join(s.replace(" ", "_") for s in self.ran),
        }


def run_job(job: Job, limit=None, echo: Callable[[str], None] = print) -> JobResult:
    """Run one job (resuming it); never raises for the job's own failure, which becomes its
    state. limit: a SharedLimit the API judge's requests also hold."""
    from pertoken.pipeline.judge.api import shared_limit

    start, ran = time.perf_counter(), []
    result = JobResult(job.model, Path(job.trait).stem, "done")
    try:
        with shared_limit(limit) if limit is not None else contextlib.nullcontext():
            _Steps(job, result, ran, echo).run()
    except PertokenError as e:
        result.state = f"failed: {e}"
    except Exception as e:  # a bug or a library's error: reported, and the others go on
        result.state = f"failed: {type(e).__name__}: {e}"
    result.seconds, result.ran = time.perf_counter() - start, ran
    return result


class _Steps:
    """The stages of one job; `ran` collects those that did work."""

    def __init__(self, job: Job, result: JobResult, ran: list[str], echo):
        self.job, self.result, self.ran, self.echo = job, result, ran, echo
        self.backend = None

    def run(self) -> None:
        from pertoken.pipeline.run import Watch, run_pipeline
        from pertoken.pipeline.vet.card import load_report

        j, r = self.job, self.result
        o = j.run
        run = run_pipeline(
            self.choice(), j.trait, out=j.out, generation=from_flat(Generation, o),
            judging=from_flat(JudgeSettings, o), extraction=from_flat(Extraction, o),
            watch=Watch(progress=False, on_stage=self.stage),
        )  # fmt: skip
        self.backend, self.vector = (
            run.backend,
            run.vectors.get("probe", run.vectors["response_avg"]),
        )
        r.trait, r.folder = run.folder.name, str(run.folder)
        r.pairs_kept, r.pairs_total = run.pairs_kept, run.pairs_total
        if run.report is not None:
            card = load_report(run.report)
            r.suggested_row = card.suggested_row
            if card.suggested_row is not None:
                r.heldout_auroc = card.row(card.suggested_row).auroc
        self.folder = run.folder
        if j.eval is not None:
            r.best_eval = self.once("eval", j.eval, self.eval)
        if j.trace is not None:
            for path in j.trace["inputs"]:
                self.once(f"trace {Path(path).stem}", j.trace | {"inputs": path}, self.trace)

    def stage(self, name: str, status: str, seconds: float) -> None:
        if status != "skipped":
            self.ran.append(name)
        self.echo(f"{self.job.label}: {name} {status} ({seconds:.1f}s)")

    def once(self, name: str, options: dict, work) -> str:
        """Run `work(options)` unless a stamp shows it done with these options on this vector;
        the stamp keeps its one-line result."""
        stamp = inside(self.folder, f".{name.replace(' ', '-')}.done.json")
        key = _digest({"options": options, "run": self.job.run, "vector": _sha(self.vector)})
        with contextlib.suppress(OSError, json.JSONDecodeError):
            old = json.loads(stamp.read_text())
            if old["key"] == key:
                self.stage(name, "skipped", 0.0)
                return old["result"]
        start = time.perf_counter()
        result = work(options)
        write_text_atomic(stamp, json.dumps({"key": key, "result": result}) + "\n")
        self.stage(name, "done", time.perf_counter() - start)
        return result

    def choice(self) -> ModelChoice:
        """The job's model as its [run] options load it."""
        j = self.job
        choice = from_flat(ModelChoice, j.run, model=j.model)
        if (j.gpus or 0) > 1 and not choice.device:
            choice = replace(choice, device="auto")  # the model spreads over the task's GPUs
        return choice

    def model(self):
        if self.backend is None:
            o = self.job.run
            self.backend = ModelChoice(
                self.job.model, o.get("backend", "auto"), o.get("dtype"), o.get("device")
            ).load()
        return self.backend

    def layers(self, options: dict, what: str) -> list[int]:
        if options["layers"]:
            return list(options["layers"])
        if self.result.suggested_row is None:
            raise PertokenError(f"no suggested layer to {what} at: give [{what}] layers")
        return [self.result.suggested_row]

    def eval(self, e: dict) -> str:
        from pertoken.pipeline.judge.judges import make_judge
        from pertoken.pipeline.options import Generation
        from pertoken.pipeline.sweep.grid import evaluate
        from pertoken.pipeline.sweep.search import search_coefs
        from pertoken.pipeline.sweep.store import Sweep
        from pertoken.traits import load_trait
        from pertoken.vectors import load_vector

        o, kit, b = self.job.run, load_trait(self.job.trait), self.model()
        judge = make_judge(
            kit, from_flat(JudgeSettings, o), progress=False,
            model=from_flat(ModelChoice, o, model=self.job.model), backend=lambda: b,
        )  # fmt: skip
        auto = e["coefs"] == "auto"
        sweep = Sweep(
            kit, load_vector(self.vector), self.layers(e, "eval"),
            [] if auto else [float(c) for c in e["coefs"]], positions=e["positions"],
            vector_path=self.vector,
        )  # fmt: skip
        gen = Generation(samples=e["n_per_question"], max_tokens=e["max_new_tokens"],
                         temperature=e["temperature"], seed=e["seed"],
                         batch_size=e["batch_size"])  # fmt: skip
        opts = dict(
            out_dir=inside(self.folder, "eval"), judge=judge, generation=gen, progress=False
        )
        if auto:
            best = search_coefs(b, sweep, min_coherence=e["min_coherence"], **opts).best
        else:
            summary = evaluate(b, sweep, **opts).summary
            held = [s for s in summary if (s.coherence or 0) >= e["min_coherence"]]
            held = [s for s in held if s.coef != 0 and s.trait is not None]
            best = max(held, key=lambda s: s.trait, default=None)
        return _setting(best and (best.layer, best.coef, best.trait, best.coherence))

    def trace(self, t: dict) -> str:
        from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
        from pertoken.vectors import load_vector

        gen = Generation(1, t["max_new_tokens"], t["temperature"], seed=t["seed"])
        tracing = Tracing(
            generation=gen, system=t["system"], batch_size=t["batch_size"], chunk=t["chunk"],
            vector_files={self.result.trait: str(self.vector)}, progress=False,
        )  # fmt: skip
        out = inside(self.folder, "trace", Path(t["inputs"]).stem)
        res = trace_dataset(
            self.model(), input=t["inputs"], out_dir=out, rows=self.layers(t, "trace"),
            vectors={self.result.trait: load_vector(self.vector)}, tracing=tracing,
        )  # fmt: skip
        return f"{res.items} items"


def _setting(best) -> str:
    """`layer L coef C (trait T, coherence H)`, or `none held coherence`."""
    if not best:
        return "none held coherence"
    layer, coef, trait, coherence = best
    return f"layer {layer} coef {coef:g} ({trait:.0f}, coherence {coherence:.0f})"


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def gpus_for(model: str, *, dtype: str | None, gpu_memory_gb: float) -> int:
    """GPUs whose memory holds `model`'s weights with headroom (one when its size is unknown)."""
    from pertoken.backends.memory import estimate_weights

    weights = estimate_weights(model, dtype=dtype)
    if weights is None:
        return 1
    return max(1, math.ceil(weights.bytes * HEADROOM / (gpu_memory_gb * 2**30)))


def run_sweep(
    plan: Plan, *, ray_address: str | None = None, echo: Callable[[str], None] = print
) -> list[JobResult]:
    """Run (or resume) every job of `plan`, here one by one or as Ray tasks (`ray_address`:
    local, auto or an address); writes `plan.out/sweep.csv`, one row per job in plan order."""
    jobs = plan.jobs()
    judging = from_flat(JudgeSettings, plan.run)
    if not judging.judge_model.startswith("local:"):  # a missing key or a server down: first
        check_endpoint(judging.base_url)
    with output_lock(plan.out, folder=True):  # one sweep at a time in a folder
        if ray_address is None:
            results = []
            for job in jobs:
                results.append(run_job(job, echo=echo))
                echo(_finished(results[-1]))
        else:
            from pertoken.pipeline.distributed import ray_runtime

            with ray_runtime(ray_address):
                results = _on_ray(plan, jobs, echo)
        write_csv_atomic(plan.out / "sweep.csv", COLUMNS, [r.row() for r in results])
    return results


def _on_ray(plan: Plan, jobs: list[Job], echo) -> list[JobResult]:
    """One task per job, as many at once as the cluster has room for; results in plan order."""
    from pertoken.pipeline.distributed import SharedLimit, require_ray, unwrap, worker_env

    ray = require_ray()
    gpus = _job_gpus(plan, jobs, ray)
    limit = SharedLimit(int(from_flat(JudgeSettings, plan.run).concurrency))
    env = {"env_vars": worker_env()}
    task = ray.remote(run_job)
    results: list[JobResult | None] = [None] * len(jobs)
    refs = {}
    for k, (job, g) in enumerate(zip(jobs, gpus)):
        if isinstance(g, str):  # no node has that many GPUs: it would wait forever
            results[k] = JobResult(job.model, Path(job.trait).stem, g)
            continue
        opts = dict(num_gpus=g, num_cpus=1, max_retries=1, retry_exceptions=False, runtime_env=env)
        job = Job(**{**asdict(job), "gpus": g})
        refs[task.options(**opts).remote(job, limit)] = k
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        k = refs[done[0]]
        try:
            results[k] = ray.get(done[0])
        except ray.exceptions.RayError as e:  # the worker died (and its retry too)
            results[k] = JobResult(jobs[k].model, Path(jobs[k].trait).stem, f"failed: {unwrap(e)}")
        echo(_finished(results[k]))
    return results


def _job_gpus(plan: Plan, jobs: list[Job], ray) -> list[float | str]:
    """GPUs each job asks for: the plan's `gpus`, else from the model's size; 0 on a cluster
    without GPUs; a `failed: ...` state when no node has that many."""
    nodes = [n.get("Resources", {}).get("GPU", 0) for n in ray.nodes() if n.get("Alive")]
    most = max(nodes, default=0)
    out: list[float | str] = []
    for job in jobs:
        if not most:
            out.append(0)
            continue
        g = plan.gpus or gpus_for(job.model, dtype=job.run.get("dtype"),
                                  gpu_memory_gb=plan.gpu_memory_gb)  # fmt: skip
        out.append(g if g <= most else f"failed: needs {g:g} GPUs; the largest node has {most:g}")
    return out


def _finished(r: JobResult) -> str:
    return f"{model_basename(r.model)}/{r.trait}: {r.state} ({r.seconds:.1f}s)"


def format_table(results: list[JobResult]) -> str:
    """One line per job: pairs kept, suggested row, held-out AUROC, best eval, time, state."""
    head = ["model", "trait", "pairs", "row", "AUROC", "best eval", "time", "state"]
    rows = [
        [
            model_basename(r.model), r.trait,
            "-" if r.pairs_kept is None else f"{r.pairs_kept}/{r.pairs_total}",
            "-" if r.suggested_row is None else str(r.suggested_row),
            "-" if r.heldout_auroc is None else f"{r.heldout_auroc:.3f}",
            r.best_eval or "-", f"{r.seconds:.0f}s", r.state,
        ]
        for r in results
    ]  # fmt: skip
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join(
        "  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows]
    )
