"""A sweep's plan: a TOML file naming models, traits, an output folder and the options of
`pertoken run` (`[run]`), and optionally an eval grid (`[eval]`) and traces (`[trace]`) of
each job's vector. Relative paths in the plan are relative to the plan file.

    models = ["google/gemma-2-2b-it", "meta-llama/Llama-3.1-8B-Instruct"]
    traits = ["paternalism", "kits/flattery.json"]
    out = "study"
    gpus = 1                      # per job; default: from each model's size

    [run]
    judge_model = "gpt-4.1-mini-2025-04-14"
    n_per_question = 5
    max_new_tokens = 300

    [eval]
    layers = [12, 16]             # default: the report card's suggested layer
    coefs = [-2, 0, 2]            # or "auto"

    [trace]
    inputs = ["chats.jsonl"]
    layers = [12, 16]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.paths import model_basename

_TOP = ("models", "traits", "out", "gpus", "gpu_memory_gb", "run", "eval", "trace")
# `pertoken run`'s options a plan's [run] table may set (pipeline.options.FLAT_NAMES, less
# the model, which the plan names); the model, trait and folder are set by the sweep itself
RUN_KEYS = ("backend", "n_per_question", "max_new_tokens", "temperature", "sampler", "seed",
            "judge_model", "base_url", "threshold", "concurrency", "batch_size", "cache",
            "dtype", "device", "compile", "method", "coherence_prompt",
            "max_consecutive_failures")  # fmt: skip
_PATH_OPTIONS = ("cache",)
EVAL_KEYS = {
    "layers": None,  # None: the suggested layer
    "coefs": [-2.0, -1.0, 0.0, 1.0, 2.0],
    "min_coherence": 70.0,
    "n_per_question": 10,
    "max_new_tokens": 1000,
    "temperature": None,
    "positions": "response",
    "batch_size": 16,
    "seed": 0,
}
TRACE_KEYS = {
    "inputs": None,
    "layers": None,  # None: the suggested layer
    "batch_size": 16,
    "chunk": 256,
    "system": None,
    "max_new_tokens": 200,
    "temperature": 0.0,
    "seed": 0,
}


@dataclass(frozen=True)
class Job:
    """One (model, trait) pipeline of a sweep, with everything it needs to run anywhere."""

    model: str
    trait: str  # kit name or path, as the plan gives it
    out: Path
    run: dict
    eval: dict | None = None
    trace: dict | None = None
    gpus: float | None = None  # None: from the model's size

    @property
    def label(self) -> str:
        return f"{model_basename(self.model)}/{Path(self.trait).stem}"


@dataclass
class Plan:
    path: Path
    models: list[str]
    traits: list[str]
    out: Path
    run: dict = field(default_factory=dict)
    eval: dict | None = None
    trace: dict | None = None
    gpus: float | None = None
    gpu_memory_gb: float = 80.0  # memory of one GPU, for the GPUs a model asks for

    def jobs(self) -> list[Job]:
        """Every (model, trait) pair, models first."""
        opts = dict(run=self.run, eval=self.eval, trace=self.trace, gpus=self.gpus)
        return [Job(m, t, self.out, **opts) for m in self.models for t in self.traits]


def read_plan(path: str | Path) -> Plan:
    """Parse and check a plan file; every mistake is one line naming the key and the fix."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        msg = f"cannot read the plan {path} ({type(e).__name__}): check the path"
        raise PertokenError(msg) from None
    except tomllib.TOMLDecodeError as e:
        raise PertokenError(f"{path} is not valid TOML ({e}): fix the plan") from None
    _known(data, _TOP, f"{path}")
    here = path.parent
    plan = Plan(
        path=path,
        models=[_local(here, m) for m in _names(data, "models", path)],
        traits=[_local(here, t) for t in _names(data, "traits", path)],
        out=here / _string(data, "out", path),
        run=_run_options(data.get("run", {}), here, path),
        eval=_table(data, "eval", EVAL_KEYS, path),
        trace=_table(data, "trace", TRACE_KEYS, path),
        gpus=_number(data, "gpus", path),
        gpu_memory_gb=_number(data, "gpu_memory_gb", path) or 80.0,
    )
    if plan.trace is not None:
        plan.trace["inputs"] = [str(here / p) for p in _inputs(plan.trace["inputs"], path)]
    _check_eval(plan.eval, path)
    _distinct(plan)
    return plan


def _known(table: dict, keys, where: str) -> None:
    unknown = [k for k in table if k not in keys]
    if unknown:
        raise PertokenError(f"{where}: unknown key {unknown[0]!r}: the keys are {', '.join(keys)}")


def _names(data: dict, key: str, path: Path) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PertokenError(f'{path}: `{key}` must be a list of names, e.g. {key} = ["a", "b"]')
    return value


def _string(data: dict, key: str, path: Path) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise PertokenError(f'{path}: `{key}` must name a folder, e.g. {key} = "study"')
    return value


def _number(data: dict, key: str, path: Path) -> float | None:
    value = data.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise PertokenError(f"{path}: `{key}` must be a number, not {value!r}")
    if value is not None and value < 0:
        raise PertokenError(f"{path}: `{key}` must not be negative")
    return value


def _local(here: Path, name: str) -> str:
    """A name that is a file or folder beside the plan becomes that path; else it stays
    (a bundled kit name, a hub id)."""
    return str(here / name) if (here / name).exists() else name


def _run_options(table, here: Path, path: Path) -> dict:
    from pertoken.pipeline.judge.rubrics import read_rubric

    if not isinstance(table, dict):
        raise PertokenError(f"{path}: [run] must be a table of `pertoken run` options")
    _known(table, RUN_KEYS, f"{path} [run]")
    opts = dict(table)
    for k in _PATH_OPTIONS:
        if opts.get(k):
            opts[k] = str(here / opts[k])
    if opts.get("coherence_prompt"):
        opts["coherence_prompt"] = read_rubric(here / opts["coherence_prompt"])
    return opts


def _table(data: dict, key: str, defaults: dict, path: Path) -> dict | None:
    if key not in data:
        return None
    table = data[key]
    if not isinstance(table, dict):
        raise PertokenError(f"{path}: [{key}] must be a table")
    _known(table, defaults, f"{path} [{key}]")
    out = defaults | table
    layers = out["layers"]
    if layers is not None and not (
        isinstance(layers, list) and layers and all(isinstance(x, int) for x in layers)
    ):
        raise PertokenError(f"{path} [{key}]: layers must be a list of rows, e.g. [12, 16]")
    return out


def _inputs(value, path: Path) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise PertokenError(f'{path} [trace]: inputs must name files, e.g. ["chats.jsonl"]')
    stems = [Path(v).stem for v in value]
    if len(set(stems)) < len(stems):
        raise PertokenError(f"{path} [trace]: two inputs share a file name: rename one")
    return value


def _check_eval(table: dict | None, path: Path) -> None:
    if table is None:
        return
    coefs = table["coefs"]
    numbers = isinstance(coefs, list) and coefs
    if coefs != "auto" and not (numbers and all(isinstance(c, (int, float)) for c in coefs)):
        raise PertokenError(f'{path} [eval]: coefs must be a list of numbers or "auto"')


def _distinct(plan: Plan) -> None:
    """Two models (or kits) whose outputs would share a folder are refused."""
    for what, names, key in (("models", plan.models, model_basename),
                             ("traits", plan.traits, lambda t: Path(t).stem)):  # fmt: skip
        seen: dict[str, str] = {}
        for n in names:
            if key(n) in seen:
                raise PertokenError(
                    f"{plan.path}: {what} {seen[key(n)]!r} and {n!r} would write the same "
                    f"folder {key(n)!r}: list each once, or rename one"
                )
            seen[key(n)] = n
