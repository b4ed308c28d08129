"""The answers of a sweep folder, shared by eval's grid and the coefficient search.

A setting is (layer, coef): every evaluation question (no system instruction) answered with
the vector's row added at `layer` times `coef`, or its projection capped at `coef`. The store
owns `answers.csv` and `eval.json`: it refuses a folder made another way, resumes the rows
already there, answers what the asked settings lack in one generate call (or on a pool's
actors, a setting a shard), saving each setting's rows as soon as its last answer ends, and
judges the rows missing a score. The unsteered setting is answered once and filed under one
layer, its home.
"""

from __future__ import annotations

import functools
import json
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from pertoken.atomic import write_text_atomic
from pertoken.backends.base import Steer
from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import read_table, write_csv_atomic
from pertoken.pipeline.generate import sample_seed
from pertoken.pipeline.options import Generation
from pertoken.rows import check_steer_row
from pertoken.vectors import PersonaVector

MODEL_SAMPLER = ("temperature", "top_k", "top_p", "repetition_penalty")


@dataclass(frozen=True)
class Sweep:
    """What a sweep folder's answers are of: the trait (its evaluation questions), the vector
    and the file eval.json names for it, the rows to steer at, the values of a grid (a search
    finds its own), the Steer positions ("response" steers the answer's tokens, as upstream's
    evaluation does) and the operator: `add` coefficients, or `cap` thresholds (in the units
    the monitor prints)."""

    trait: object
    vector: PersonaVector
    layers: list[int]
    coefs: list[float] = field(default_factory=list)
    positions: str = "response"
    op: str = "add"
    vector_path: str | Path = "vector"

    def steer(self, layer: int, value: float) -> Steer | None:
        """The Steer of one setting; None where it is unsteered (a coefficient of 0)."""
        direction = self.vector.row(layer)
        if self.op == "cap":
            return Steer.cap(layer, direction, hi=value, positions=self.positions)
        return None if value == 0 else Steer.single(layer, direction, value, self.positions)


def answer_columns(trait: str) -> list[str]:
    """`layer, coef, question, answer, {trait}, coherence`, then the row's key."""
    return ["layer", "coef", "question", "answer", trait, "coherence", "question_id", "sample"]


def read_answers(path: Path, trait: str) -> list[dict]:
    """Rows of an earlier run's answers.csv (none when it does not exist)."""
    if not path.is_file():
        return []
    header, rows = read_table(path)
    missing = [c for c in answer_columns(trait)[:6] if c not in header]
    if missing:
        raise PertokenError(
            f"{path} lacks the column(s) {', '.join(missing)}: it is not the answers of a "
            f"`pertoken eval` run for trait {trait!r}; choose another --out or remove it"
        )
    return rows


def write_answers(path: Path, trait: str, rows: list[dict]) -> None:
    write_csv_atomic(path, answer_columns(trait), rows)


def check_sweep(backend, sweep: Sweep, generation: Generation, empty: str) -> None:
    """The vector fits the model, each row is one to steer, and there are samples; `empty`
    is the error when no layer is given."""
    sweep.vector.check_model(backend.n_layers, backend.hidden_size, sweep.vector_path)
    if sweep.op not in ("add", "cap"):
        raise PertokenError(
            f"eval sweeps coefficients (add) or cap thresholds (cap), not {sweep.op!r}"
        )
    if not sweep.layers:
        raise PertokenError(empty)
    for layer in sweep.layers:
        check_steer_row(layer, backend.n_layers)
    if generation.samples < 1:
        raise PertokenError(f"--n-per-question must be at least 1, not {generation.samples}")


def draw_options(backend, generation: Generation) -> dict:
    """The sampling keywords of `backend.generate`: the temperature (greedy for one sample),
    and the checkpoint's top_k, top_p and repetition penalty with the `model` sampler."""
    sampling = generation.sampling(backend)
    keys = MODEL_SAMPLER if generation.sampler != "plain" else MODEL_SAMPLER[:1]
    return {k: getattr(sampling, k) for k in keys}


def identity(backend, sweep: Sweep, generation: Generation) -> dict:
    """What a folder's answers depend on (eval.json): model, backend, dtype, trait, vector,
    and how they were sampled and steered."""
    draw = draw_options(backend, generation)
    out = {
        "model": backend.model_id,
        "backend": backend.name,
        "dtype": backend.dtype,
        "trait": sweep.trait.name,
        "vector": str(sweep.vector_path),
        "n_per_question": generation.samples,
        "max_new_tokens": generation.max_tokens,
        "temperature": draw["temperature"],
        "positions": sweep.positions,
        "seed": generation.seed,
    }
    if generation.sampler != "plain":  # a plain sweep keeps the identity it always had
        out |= {"sampler": generation.sampler, **draw}
    return out | ({"op": sweep.op} if sweep.op != "add" else {})


@dataclass
class _Job:
    """What one setting lacks: (question index, sample) pairs, answered with `steer`."""

    layer: int
    coef: float
    steer: Steer | None
    pairs: list[tuple[int, int]]

    def prompts(self, backend, trait, seed: int) -> tuple[list[str], list[int]]:
        # each (question, sample) has its own seed, the same in every setting, so settings
        # differ only by the steering
        questions = trait.eval_questions
        prompts = [backend.chat_prompt(None, questions[i]) for i, _ in self.pairs]
        return prompts, [sample_seed(seed, f"{trait.name}_{i}", j) for i, j in self.pairs]

    def rows(self, trait, answers: list[str]) -> list[dict]:
        q = trait.eval_questions
        return [
            {"layer": self.layer, "coef": self.coef, "question": q[i], "answer": a,
             trait.name: "", "coherence": "", "question_id": f"{trait.name}_{i}", "sample": j}
            for (i, j), a in zip(self.pairs, answers, strict=True)
        ]  # fmt: skip


def answer_job(trait, seed: int, gen: dict, backend, job: _Job) -> list[dict]:
    """A pool actor's work: the answer rows of one setting."""
    prompts, seeds = job.prompts(backend, trait, seed)
    return job.rows(trait, backend.generate(prompts, steer=job.steer, seeds=seeds, **gen))


class AnswerStore:
    """answers.csv of one sweep folder, its rows in memory, filled and judged on demand. Use
    with the folder's lock held; `claim` before anything else."""

    def __init__(self, backend, sweep: Sweep, generation: Generation, out: Path, *,
                 progress: bool = True, pool=None):  # fmt: skip
        self.backend, self.sweep, self.generation = backend, sweep, generation
        self.path, self.name = out / "answers.csv", sweep.trait.name
        self.gen = dict(max_new_tokens=generation.max_tokens, batch_size=generation.batch_size,
                        **draw_options(backend, generation))  # fmt: skip
        self.progress, self.pool = progress, pool
        self.rows: list[dict] = []
        self.judge = None  # set by claim
        self.generated = 0  # answers generated by this process

    def claim(self, judge) -> None:
        """Refuse a folder whose answers were made another way; else read its rows and record
        these settings and the judge. Scores by another judge (model, server or rubric) are
        cleared, so that every answer is judged by this one (a cached score costs no call)."""
        out = self.path.parent
        made = identity(self.backend, self.sweep, self.generation)
        old = _check_identity(out / "eval.json", made)
        self.rows, self.judge = read_answers(self.path, self.name), judge
        if judge.identity is not None and (old or {}).get("judge") not in (None, judge.identity):
            for r in self.rows:
                r[self.name] = r["coherence"] = ""
            self.save()  # before eval.json names the new judge
        meta = made | ({"judge": judge.identity} if judge.identity is not None else {})
        write_text_atomic(out / "eval.json", json.dumps(meta, indent=2) + "\n")

    def save(self) -> None:
        write_answers(self.path, self.name, self.rows)

    def home(self, layer: int, coef: float) -> int:
        """The layer a setting's rows are filed under: the unsteered answers are one setting,
        under the first layer that has them."""
        if self.sweep.op != "add" or coef != 0:
            return layer
        return min((int(r["layer"]) for r in self.rows if float(r["coef"]) == 0), default=layer)

    def rows_of(self, layer: int, coef: float, questions: list[int] | None = None) -> list[dict]:
        """The setting's rows, those of these question indices when given."""
        home = self.home(layer, coef)
        rows = [r for r in self.rows if float(r["coef"]) == coef and int(r["layer"]) == home]
        if questions is None:
            return rows
        qids = {f"{self.name}_{i}" for i in questions}
        return [r for r in rows if r["question_id"] in qids]

    def ask(self, settings: list[tuple], questions: list[int], label: str = "eval") -> None:
        """Answer what these (layer, coef) settings lack on these question indices (`label`
        names the progress bar); the new rows follow the order of `settings`, however the
        answers end."""
        kept, jobs = len(self.rows), self._jobs(settings, questions)
        if jobs:
            (self._generate if self.pool is None else self._map)(jobs, label)
        self.order(kept, [(j.layer, j.coef) for j in jobs])

    def order(self, kept: int, settings: list[tuple[int, float]]) -> None:
        """The rows after the first `kept` in the order of `settings`, then saved."""
        at = {(int(L), float(c)): k for k, (L, c) in enumerate(settings)}

        def place(r: dict) -> int:
            return at.get((int(r["layer"]), float(r["coef"])), len(at))

        self.rows[kept:] = sorted(self.rows[kept:], key=place)
        self.save()

    def judged(self, rows: list[dict]) -> list[dict]:
        """These rows, with the ones missing either score judged (a refusal is cached, so
        asking again costs no call) and answers.csv saved."""
        unjudged = [r for r in rows if r[self.name] == "" or r["coherence"] == ""]
        if unjudged:
            self.judge.judge_rows(unjudged)
            self.save()
        return rows

    def copy_unsteered(self, layers: list[int]) -> None:
        """File the unsteered answers under each of `layers` that lacks them too (a grid's
        coefficient 0 is one line per layer)."""
        filed = {int(r["layer"]) for r in self.rows if float(r["coef"]) == 0}
        home = self.rows_of(min(filed), 0.0) if filed else []
        for L in layers:
            if L not in filed:
                self.rows += [{**r, "layer": L} for r in home]

    def _jobs(self, settings, questions) -> list[_Job]:
        """One job a setting that lacks answers; the unsteered setting once."""
        n, jobs = self.generation.samples, {}
        for L, c in settings:
            steer = self.sweep.steer(L, c)
            if steer is None and any(j.steer is None for j in jobs.values()):
                continue
            have = {(r["question_id"], int(r["sample"])) for r in self.rows_of(L, c)}
            pairs = [(i, j) for i in questions for j in range(n)]
            pairs = [(i, j) for i, j in pairs if (f"{self.name}_{i}", j) not in have]
            if pairs:
                home, coef = self.home(L, c), (c if steer is not None else 0.0)
                jobs[home, coef] = _Job(home, coef, steer, pairs)
        return list(jobs.values())

    def _generate(self, jobs: list[_Job], label: str) -> None:
        """Every job in one generate call (each prompt carries its setting's steer, so slots
        freed by short answers take the next prompts of any setting)."""
        from tqdm import tqdm

        made = [j.prompts(self.backend, self.sweep.trait, self.generation.seed) for j in jobs]
        prompts, seeds = [p for ps, _ in made for p in ps], [s for _, ss in made for s in ss]
        starts = [0]
        for j in jobs:
            starts.append(starts[-1] + len(j.pairs))
        steers = [j.steer for j in jobs for _ in j.pairs]
        answers: dict[int, str] = {}
        saved: set[int] = set()

        def save(s: int) -> None:
            block = [answers[i] for i in range(starts[s], starts[s + 1])]
            self.rows.extend(jobs[s].rows(self.sweep.trait, block))
            saved.add(s)
            self.save()

        def done(k: int, text: str) -> None:
            answers[k] = text
            bar.update(1)
            s = bisect_right(starts, k) - 1  # the job of answer k, saved once all are in
            if all(i in answers for i in range(starts[s], starts[s + 1])):
                save(s)

        bar = tqdm(total=len(prompts), unit="answer", desc=label, smoothing=0,
                   disable=not self.progress)  # fmt: skip
        with bar:
            out = self.backend.generate(prompts, steer=steers, seeds=seeds, on_answer=done,
                                        **self.gen)  # fmt: skip
        answers |= dict(enumerate(out))
        for s in range(len(jobs)):
            if s not in saved:
                save(s)
        self.generated += len(prompts)

    def _map(self, jobs: list[_Job], label: str) -> None:
        """The jobs on the pool's actors, one a shard; answers.csv is saved as each comes
        back."""
        from tqdm import tqdm

        from pertoken.pipeline.distributed import map_shards

        fn = functools.partial(answer_job, self.sweep.trait, self.generation.seed, self.gen)
        base, got = list(self.rows), {}
        bar = tqdm(total=sum(len(j.pairs) for j in jobs), unit="answer", desc=label,
                   disable=not self.progress)  # fmt: skip
        with bar:
            for i, rows in map_shards(fn, jobs, pool=self.pool):
                got[i] = rows
                self.rows[:] = base + [r for k in sorted(got) for r in got[k]]
                self.save()
                bar.update(len(rows))
        self.generated += sum(len(j.pairs) for j in jobs)


def _check_identity(path: Path, made: dict) -> dict | None:
    """The earlier eval.json, when its answers were made the same way; else a clear error."""
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    before = {k: v for k, v in old.items() if k != "judge"}
    if before != made:
        keys = [*made, *(k for k in before if k not in made)]
        diff = ", ".join(
            f"{k}: {before.get(k)!r} -> {made.get(k)!r}"
            for k in keys
            if before.get(k) != made.get(k)
        )
        raise PertokenError(
            f"{path.parent} holds a sweep with other settings ({diff}): choose another "
            "--out, or remove the folder to start over"
        )
    return old
