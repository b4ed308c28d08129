"""Vet: a report card for a persona vector, `{trait}_report.{json,md,png}`.

Per row: |v|, the mean residual norm |h| of the kept answers, the coefficient at which
coef * |v| / |h| is 0.25, 0.5 and 1, and the held-out separation (AUROC, Cohen's d) of kept
positive vs negative samples projected on the vector re-extracted without the held-out questions;
cosines with the neighbouring row and with the other vectors of the folder; warnings for shallow
separation and massive activations; a suggested row. Everything comes from the per-sample
summaries beside the vector; the model runs only when they are missing or stale.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pertoken.errors import PertokenError
from pertoken.pipeline.extract import pair_rows
from pertoken.pipeline.summaries import (
    SampleSummaries,
    collect,
    from_pairs,
    load_summaries,
    save_summaries,
    summaries_path,
)
from pertoken.pipeline.vet import stats as st
from pertoken.pipeline.vet.card import RowCard, VetReport, report_paths
from pertoken.pipeline.vet.causal import (
    LOOP_MARGIN,
    LOOP_SHARE,
    MAX_COST,
    Causal,
    candidate_rows,
    check_questions,
    free_run,
    held_out_texts,
    measure,
    min_distinct,
    suggest,
)
from pertoken.pipeline.vet.write import write_report
from pertoken.vectors import PersonaVector, load_vector

SATURATED = 0.9  # held-out AUROC on every candidate row at or above this cannot rank rows
_NAME = re.compile(r"(?P<trait>.+)_(?P<kind>response_avg|prompt_avg|prompt_last)_(diff|probe)")


@dataclass(frozen=True)
class Vetting:
    """trait and the kept-pair threshold: default the vector's sidecar; out_dir: default the
    vector's folder; holdout: the share of questions held out, drawn with `seed`;
    batch_size: pairs read at once when the summaries are computed."""

    trait: str | None = None
    out_dir: str | Path | None = None
    threshold: float | None = None
    holdout: float = 0.3
    seed: int = 0
    batch_size: int = 8


@dataclass(frozen=True)
class CausalCheck:
    """Per candidate row (`rows`, default all but rows 0, 1 and the last), the teacher-forced
    gain and costs (causal.py) on up to `pairs` held-out pairs with answers cut to `tokens`
    tokens, and a greedy loop check of twice that length; the suggestion becomes the largest
    gain whose trait cost is at most `max_cost` nats per token and that does not loop
    (causal.suggest). judged: the rows of that many top causal settings, at each coefficient
    (and unsteered), answer at least MIN_ANSWERS questions (held-out first) in one generate
    call, scored by `judge` (a Judge, judges.make_judge)."""

    max_cost: float = MAX_COST
    pairs: int = 4
    tokens: int = 32
    rows: list[int] | None = None
    judged: int = 0
    judge: object = None


def vet_vector(
    vector_path: str | Path,
    *,
    pos_csv: str | Path,
    neg_csv: str | Path,
    backend=None,
    model: str | None = None,
    vetting: Vetting = Vetting(),
    causal: CausalCheck | None = None,
) -> VetReport:
    """Vet one vector against the pos/neg CSVs it came from; write the report and return it.

    backend: a loaded backend, or a function that loads one; used when the summaries
    beside the vector are missing, stale or of another model than `model`, and by the causal
    measure (`causal`; None: separation only). vetting: the trait, threshold, output folder
    and held-out split (Vetting).
    """
    path = Path(vector_path)
    vec, v, c = load_vector(path), vetting, causal
    trait, kind, method = _identity(path, vec, v.trait)
    t = v.threshold if v.threshold is not None else vec.meta.get("threshold", 50)
    v = replace(v, trait=trait, threshold=t)
    pairs = pair_rows(pos_csv, neg_csv, trait=trait, threshold=t)
    samples = _samples(vec, path, pairs, kind, backend, model, v)
    report = build_report(vec, samples, path=path, trait=trait, kind=kind, method=method, vetting=v)
    if c is not None:
        b = _backend(backend)
        texts = held_out_texts(
            b, pairs, set(report.split["held_out_questions"]), max_pairs=c.pairs,
            max_tokens=c.tokens,
        )  # fmt: skip
        coefs = {k: [r.coef[k] for r in report.rows] for k in report.rows[0].coef}
        rows = c.rows or candidate_rows(vec.n_layers)
        m = measure(b, vec.data, texts, coefs, rows)
        # the held-out questions only: free generation costs far more than teacher forcing.
        # Loops set in after a fluent start: look twice as far as the teacher-forced answers
        prompts = [p for p, _ in texts.own]
        free_run(b, vec.data, m, coefs, prompts, max_cost=c.max_cost, max_tokens=2 * c.tokens)
        add_causal(report, m, c.max_cost)
        if c.judged:
            from pertoken.pipeline.vet.judged import judged_check

            questions = check_questions(pairs, set(report.split["held_out_questions"]))
            report.judged = judged_check(b, report, vec.data, questions, c.judge, n=c.judged)
            _judged_suggestion(report)
    write_report(report, report_paths(v.out_dir or path.parent, trait))
    return report


def _identity(path: Path, vec: PersonaVector, trait: str | None) -> tuple[str, str, str]:
    m = _NAME.fullmatch(path.stem)
    trait = trait or vec.meta.get("trait") or (m and m["trait"])
    if not trait:
        raise PertokenError(f"cannot tell the trait of {path}: pass --trait")
    if not re.fullmatch(r"[\w][\w.-]*", trait):
        raise PertokenError(f"trait name {trait!r} cannot name a report file: pass --trait")
    kind = vec.meta.get("kind") or (m["kind"] if m else "response_avg")
    return trait, kind, vec.meta.get("method", "mean_diff")


def _samples(vec, path, pairs, kind, backend, model, v: Vetting):
    """The stored summaries when they fit these pairs and model, else computed and stored."""
    file = summaries_path(path.parent, v.trait)
    kinds = tuple(dict.fromkeys(("response_avg", kind)))
    s = load_summaries(file)
    if s is not None and _fits(s, pairs.keys, kinds, model):
        if tuple(s.shape()) != vec.data.shape:
            raise PertokenError(
                f"{path} has shape {list(vec.data.shape)} but the summaries of "
                f"{s.meta.get('model')} in {file} are {list(s.shape())}: it was extracted from "
                "another model; vet it with that model's CSVs and folder"
            )
        return s
    b = _backend(backend, f"{file} is missing or stale")
    vec.check_model(b.n_layers, b.hidden_size, path)
    _, pos = collect(b, pairs.pos, keep=kinds, batch_size=v.batch_size)
    _, neg = collect(b, pairs.neg, keep=kinds, batch_size=v.batch_size)
    meta = {"model": b.model_id, "backend": b.name, "dtype": b.dtype}
    meta |= {"trait": v.trait, "threshold": v.threshold}
    s = from_pairs(pairs.keys, pos, neg, meta)
    save_summaries(s, file)
    return s


def _backend(backend, why: str = "the causal measure runs the model"):
    b = backend() if callable(backend) and not hasattr(backend, "summaries") else backend
    if b is None:
        raise PertokenError(f"{why} and no model is given: pass --model")
    return b


def add_causal(report: VetReport, c: Causal, max_cost: float = MAX_COST) -> None:
    """Put the causal measures on the rows and suggest by them (causal.suggest)."""
    for r in report.rows:
        r.gain, r.cost = c.gain.get(r.row), c.cost.get(r.row)
        r.trait_cost = (c.trait_cost or {}).get(r.row)
        r.distinct = None if c.distinct is None else c.distinct.get(r.row, {})
    pick = suggest(c, max_cost)
    report.causal = {"pairs": c.pairs, "questions": c.questions, "tokens": c.tokens}
    report.causal |= {"max_cost": max_cost, "within_cost": bool(pick and pick[2])}
    if c.distinct is not None:
        report.causal |= {"loop_margin": LOOP_MARGIN, "min_distinct": min_distinct(c)}
        report.causal |= {"distinct_unsteered": c.distinct0, "loop_share": LOOP_SHARE}
    if pick is None:
        return
    row, ratio, within = pick
    report.suggested_row, report.suggested_ratio = row, ratio
    report.suggested_coef = report.rows[row].coef[ratio]
    # kept apart: vet --judged may replace the suggestion
    report.causal["suggestion"] = {"row": row, "ratio": ratio, "coef": report.suggested_coef}
    if not within:
        report.warnings.append(
            f"no setting raises the trait while its trait answers lose at most {max_cost:g} "
            f"nats per token and its greedy answers at {LOOP_MARGIN:g}x the coefficient keep "
            f"{min_distinct(c):.2f} distinct token trigrams ({LOOP_SHARE:g}x the unsteered "
            f"answers' share): the suggestion (layer {row}, ratio "
            f"{ratio}) is the cheapest; check coherence before trusting it (vet --judged)"
        )


def _judged_suggestion(report: VetReport) -> None:
    from pertoken.pipeline.vet.judged import MIN_COHERENCE, judged_pick

    pick = judged_pick(report.judged)
    if pick is None:
        report.warnings.append(
            f"no judged setting kept coherence >= {MIN_COHERENCE:g}: the suggestion is the "
            "causal one; try smaller coefficients or other rows with pertoken eval"
        )
        return
    report.suggested_row, report.suggested_ratio = pick["row"], pick["ratio"]
    report.suggested_coef = pick["coef"]
    report.causal["judged_pick"] = True


def _fits(s: SampleSummaries, keys, kinds, model: str | None) -> bool:
    same = model is None or s.meta.get("model") in (model, Path(model.rstrip("/")).name)
    return same and s.pair_keys == [tuple(k) for k in keys] and set(kinds) <= set(s.states)


def build_report(
    vec: PersonaVector, s: SampleSummaries, *, path, trait, kind, method, vetting=Vetting()
) -> VetReport:
    """The report card of `vec` from its samples' states (no files written); vetting: the
    held-out split."""
    holdout, seed = vetting.holdout, vetting.seed
    states, answers = s.states[kind], s.states["response_avg"]  # [N, R, H] each
    train, test = st.question_split(s.question, holdout=holdout, seed=seed)
    _check_pairs(s, train, test)
    h_norm = st.mean_norms(answers)  # [R]
    v_norm = np.linalg.norm(vec.data, axis=1)  # [R]
    auroc, d = st.heldout_separation(states, s.label, train, test, method=method, h_norm=h_norm)
    coefs = st.coefs_at(v_norm, h_norm)
    nxt = st.cosines(vec.data[:-1], vec.data[1:]) + [None]
    massive = st.massive_dims(answers)
    rows = [
        RowCard(
            row=r,
            v_norm=float(v_norm[r]),
            h_norm=float(h_norm[r]),
            coef={f"{k:g}": coefs[k][r] for k in coefs},
            auroc=float(auroc[r]),
            cohens_d=float(d[r]),
            cos_next=nxt[r],
            massive=massive.get(r, []),
        )
        for r in range(len(v_norm))
    ]
    middle = st.middle_rows(vec.n_layers)
    report = VetReport(
        vector=str(path),
        model=str(s.meta.get("model", vec.meta.get("model", ""))),
        trait=trait,
        kind=kind,
        method=method,
        pairs=len(s.label) // 2,
        split=_split_info(s, train, test, holdout, seed),
        rows=rows,
        middle_rows=middle,
        suggested_row=st.suggest_row(auroc, d, middle),
        warnings=[],
        other_vectors=_other_vectors(vec, Path(path)),
    )
    report.warnings = warnings_for(report)
    return report


def _check_pairs(s: SampleSummaries, train, test) -> None:
    n_train, n_test = int(s.label[train].sum()), int(s.label[test].sum())
    if min(n_train, n_test) < 2:
        raise PertokenError(
            f"too few kept pairs for a held-out split ({n_train} to extract, {n_test} held out; "
            "at least 2 each): generate more samples per question or lower --threshold"
        )


def _split_info(s: SampleSummaries, train, test, holdout, seed) -> dict:
    return {
        "held_out_questions": sorted(int(q) for q in set(s.question[test])),
        "train_questions": sorted(int(q) for q in set(s.question[train])),
        "held_out_pairs": int(s.label[test].sum()),
        "train_pairs": int(s.label[train].sum()),
        "holdout": holdout,
        "seed": seed,
    }


def _other_vectors(vec: PersonaVector, path: Path) -> dict[str, list[float | None]]:
    """Row-wise cosine with every other vector of the same shape in the folder."""
    out = {}
    for other in sorted(path.parent.glob("*.pt")):
        if other.resolve() == path.resolve():
            continue
        try:
            data = load_vector(other).data
        except PertokenError:
            continue  # not a persona vector: nothing to compare
        if data.shape == vec.data.shape:
            out[other.stem] = st.cosines(vec.data, data)
    return out


def warnings_for(report: VetReport) -> list[str]:
    """Shallow separation (rows 0-1 as good as the middle), weak separation, massive dims."""
    checks = (_early_warning(report), _weak_warning(report), _saturated_warning(report))
    out = [w for w in checks if w]
    massive = {r.row: r.massive for r in report.rows if r.massive}
    if massive:
        dims = sorted({d for dims in massive.values() for d, _ in dims})
        top = max(sum(share for _, share in dims) for dims in massive.values())
        out.append(
            f"massive activations: dimension(s) {', '.join(map(str, dims[:8]))} dominate |h| "
            f"at rows {_ranges(sorted(massive))} (up to {top:.0%} of |h|^2); a mean difference "
            "can follow them rather than the trait: compare with --method probe"
        )
    return out


def _early_warning(report: VetReport) -> str | None:
    auroc = [r.auroc for r in report.rows]
    best = max(auroc[r] for r in report.middle_rows)
    early = [r for r in (0, 1) if r < len(auroc) and auroc[r] >= best - 0.05]
    if best < 0.6 or not early:
        return None
    shown = ", ".join(f"row {r} (AUROC {auroc[r]:.2f})" for r in early)
    verb = "separate" if len(early) > 1 else "separates"
    head = f"{shown} {verb} about as well as the middle rows (best AUROC {best:.2f})"
    if report.kind != "response_avg":
        return (
            f"{head}: a {report.kind} vector is read from the prompt, whose tokens hold the "
            "instruction, so it carries the instruction text, not the trait; steer with the "
            "response_avg vector"
        )
    if 0 in early:
        return (
            f"{head}: the answers differ already in their tokens (row 0 is their embeddings), "
            "so the vector may carry wording rather than the trait; check that steering "
            "changes behaviour, not just words"
        )
    return (
        f"{head} while row 0, the answers' own tokens, does not (AUROC {auroc[0]:.2f}): the "
        "difference comes from the prompts, so the vector carries the instruction text, not "
        "the trait; check that the positive and negative answers differ"
    )


def _weak_warning(report: VetReport) -> str | None:
    best = max(report.rows[r].auroc for r in report.middle_rows)
    if best >= 0.7:
        return None
    return (
        f"weak separation: held-out AUROC is at most {best:.2f} in the middle rows; the vector "
        "barely tells held-out answers apart: check the judged scores or use more samples"
    )


def _saturated_warning(report: VetReport) -> str | None:
    auroc = [report.rows[r].auroc for r in candidate_rows(len(report.rows) - 1)]
    if min(auroc) < SATURATED:
        return None
    return (
        f"held-out AUROC is saturated ({min(auroc):.2f}-{max(auroc):.2f} on every candidate "
        "row): separation cannot rank the rows; rank them by what steering does (the causal "
        "gain and cost, vet --causal) or check steering at several rows"
    )


def _ranges(rows: list[int]) -> str:
    """[2, 3, 4, 7] -> '2-4, 7'."""
    parts, start = [], rows[0]
    for a, b in zip(rows, rows[1:] + [None]):
        if b != a + 1:
            parts.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(parts)
