"""`pertoken shift`: how far finetuning moved each model along a persona vector, and whether
that predicts how much more of the trait it expresses (Chen et al. 2025: r = 0.76-0.97).

Every model reads the same texts: the trait's evaluation questions (no system prompt) with the
base model's greedy answers, so a shift comes from the weights alone. Per model, row and kind,
shift = (mean h of the finetuned model - mean h of the base) . v / |v|, with h at the last
prompt token (`prompt_last`) or averaged over the answer's tokens (`response_avg`)."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.atomic import write_text_atomic
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.paths import model_basename
from pertoken.pipeline.csvio import format_score, parse_score, write_csv_atomic
from pertoken.pipeline.finetune.plots import shift_plot
from pertoken.pipeline.options import Generation, ModelChoice
from pertoken.traits import Trait, require_eval_questions
from pertoken.vectors import PersonaVector

KINDS = ("prompt_last", "response_avg")


@dataclass
class ShiftResult:
    out_dir: Path
    shifts: dict[str, dict[tuple[int, str], float]]  # model name -> (row, kind) -> shift
    scores: dict[str, float | None] = field(default_factory=dict)  # model name -> judged trait
    r: dict[str, float | None] = field(default_factory=dict)  # "row/kind" -> Pearson r
    seconds: float = 0.0


def shift_models(
    models: list[ModelChoice],
    vector: PersonaVector,
    layers: list[int],
    trait: Trait,
    out: str | Path,
    generation: Generation = Generation(samples=4, max_tokens=200),
    judge=None,
) -> ShiftResult:
    """Write `out/shift.csv` (model, row, kind, shift) for the finetuned `models[1:]` against
    the base `models[0]` and, with a judge, `scores.csv`, `answers.csv` and `shift.png`
    (judged trait against the shift, one point per model, the base at 0). generation: the
    judged answers per question (temperature 1.0 unless given, 0 with one sample), their
    tokens and seed; batch_size the texts read at once (default 16)."""
    start = time.perf_counter()
    require_eval_questions(trait)
    if len(models) < 2:
        raise PertokenError("no finetuned model: give --finetuned DIR (repeatable)")
    names = _names([m.model for m in models])
    batch_size, g = generation.batch_size or 16, generation
    folder = Path(out)
    with output_lock(folder, folder=True):
        folder.mkdir(parents=True, exist_ok=True)
        bk = models[0].load()
        units = _units(vector, layers, bk)
        prompts = [bk.chat_prompt(None, q) for q in trait.eval_questions]
        texts = (prompts, bk.generate(prompts, max_new_tokens=g.max_tokens, temperature=0.0))
        ref = _means(bk, *texts, batch_size)
        answers = _judged(bk, names[0], trait, judge, g) if judge else []
        shifts = {names[0]: {(r, k): 0.0 for r in layers for k in KINDS}}
        for model, name in zip(models[1:], names[1:]):
            del bk
            gc.collect()
            bk = model.load()
            vector.check_model(bk.n_layers, bk.hidden_size, "the vector")
            means = _means(bk, *texts, batch_size)
            shifts[name] = {(r, k): float((means[k][r] - ref[k][r]) @ units[r])
                            for r in layers for k in KINDS}  # fmt: skip
            if judge:
                answers += _judged(bk, name, trait, judge, g)
        rows = [{"model": m, "row": r, "kind": k, "shift": f"{s:.6g}"}
                for m, by in shifts.items() for (r, k), s in by.items()]  # fmt: skip
        write_csv_atomic(folder / "shift.csv", ["model", "row", "kind", "shift"], rows)
        res = ShiftResult(folder, shifts)
        if judge:
            _write_scores(res, trait.name, answers, layers)
        res.seconds = time.perf_counter() - start
    return res


def _names(models: list[str]) -> list[str]:
    base = [model_basename(m) for m in models]
    return base if len(set(base)) == len(base) else [str(m) for m in models]


def _units(vector: PersonaVector, layers: list[int], bk) -> dict[int, np.ndarray]:
    vector.check_model(bk.n_layers, bk.hidden_size, "the vector")
    vector.check_nonzero(layers, "the vector")
    return {r: vector.row(r) / np.linalg.norm(vector.row(r)) for r in layers}


def _means(bk, prompts, answers, batch_size) -> dict[str, np.ndarray]:
    """kind -> [n_layers + 1, hidden]: the mean over the prompts."""
    s = bk.summaries(prompts, answers, batch_size=batch_size)
    return {"prompt_last": s.prompt_last.mean(0), "response_avg": s.response_avg.mean(0)}


def _judged(bk, name, trait, judge, generation: Generation) -> list[dict]:
    """The model's answers to the eval questions, `samples` each, judged: rows of answers.csv."""
    opts = generation.keywords(bk)
    seed = opts.pop("seed")
    questions = [q for q in trait.eval_questions for _ in range(generation.samples)]
    prompts = [bk.chat_prompt(None, q) for q in questions]
    seeds = [seed * 1_000_003 + i for i in range(len(prompts))]
    texts = bk.generate(prompts, seeds=seeds, **opts)
    rows = [{"model": name, "question": q, "answer": a} for q, a in zip(questions, texts)]
    return judge.judge_rows(rows)


def _write_scores(res: ShiftResult, trait: str, answers: list[dict], layers: list[int]) -> None:
    header = ["model", "question", "answer", trait, "coherence"]
    write_csv_atomic(res.out_dir / "answers.csv", header, answers)
    table = []
    for name in res.shifts:
        got = [parse_score(a[trait]) for a in answers if a["model"] == name]
        coh = [parse_score(a["coherence"]) for a in answers if a["model"] == name]
        res.scores[name] = _mean(got)
        table.append({"model": name, trait: format_score(res.scores[name]),
                      "coherence": format_score(_mean(coh)), "n": len(got)})  # fmt: skip
    write_csv_atomic(res.out_dir / "scores.csv", ["model", trait, "coherence", "n"], table)
    names = [n for n in res.shifts if res.scores[n] is not None]
    for r in layers:
        for k in KINDS:
            x = [res.shifts[n][(r, k)] for n in names]
            res.r[f"{r}/{k}"] = _pearson(x, [res.scores[n] for n in names])
    first = (layers[0], "prompt_last")
    points = [(n, res.shifts[n][first], res.scores[n]) for n in names]
    shift_plot(points, trait, res.r[f"{first[0]}/{first[1]}"], res.out_dir / "shift.png")
    summary = {"scores": res.scores, "r": res.r, "plot": f"layer {first[0]} prompt_last"}
    write_text_atomic(res.out_dir / "shift.json", json.dumps(summary, indent=2) + "\n")


def _mean(values) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson r, None below three models or when either side does not vary."""
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def format_shift(res: ShiftResult, layers: list[int], trait: str) -> str:
    """The table `pertoken shift` prints: a model per line, a shift per row and kind, the
    judged score, then r per row and kind."""
    cols = [(r, k) for r in layers for k in KINDS]
    head = f"{'model':<28}" + "".join(f"{f'L{r} {k}':>18}" for r, k in cols)
    lines = [head + (f"{trait:>14}" if res.scores else "")]
    for name, by in res.shifts.items():
        line = f"{name[-28:]:<28}" + "".join(f"{by[c]:>18.4g}" for c in cols)
        if res.scores:
            score = res.scores.get(name)
            line += f"{score:>14.1f}" if score is not None else f"{'-':>14}"
        lines.append(line)
    for key, r in res.r.items():
        value = "n/a (needs 3 models that differ)" if r is None else f"{r:.3f}"
        lines.append(f"r(shift at {key}, {trait}) = {value}")
    return "\n".join(lines)
