"""Extract: persona vectors as mean residuals of kept positive answers minus kept negative ones.

Rows pair by (question i, instruction k, sample j); a pair is kept when
pos[trait] >= T, neg[trait] < 100 - T and both coherences >= 50 (CONVENTIONS).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken import __version__
from pertoken.errors import PertokenError
from pertoken.pipeline.csvio import parse_score, read_csv, sample_keys
from pertoken.vectors import PersonaVector, save_vector

KINDS = ("response_avg", "prompt_avg", "prompt_last")


@dataclass
class Pairs:
    pos: list[dict]  # kept rows, paired by index with neg
    neg: list[dict]
    total: int


def vector_paths(save_dir: str | Path, trait: str) -> dict[str, Path]:
    """{kind: save_dir/{trait}_{kind}_diff.pt}."""
    return {k: Path(save_dir) / f"{trait}_{k}_diff.pt" for k in KINDS}


def extract_vectors(
    backend,
    *,
    pos_csv: str | Path,
    neg_csv: str | Path,
    trait: str,
    threshold: float = 50,
    save_dir: str | Path,
    batch_size: int = 8,
    min_pairs: int = 1,
    judge_model: str | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Write the three `{trait}_{kind}_diff.pt` vectors (+ JSON sidecars) and return their paths.

    threshold T (default 50) filters pairs; fewer than min_pairs kept pairs is an error.
    judge_model for the sidecar defaults to the one the judge recorded beside pos_csv.
    """
    from tqdm import tqdm

    trait = getattr(trait, "name", trait)
    pairs = pair_rows(pos_csv, neg_csv, trait=trait, threshold=threshold, min_pairs=min_pairs)
    total = len(pairs.pos) + len(pairs.neg)
    with tqdm(total=total, unit="row", desc="extract", disable=not progress) as bar:
        pos = _mean_summaries(backend, pairs.pos, batch_size, bar)
        neg = _mean_summaries(backend, pairs.neg, batch_size, bar)
    meta = {
        "model": backend.model_id,
        "backend": backend.name,
        "dtype": backend.dtype,
        "trait": trait,
        "threshold": threshold,
        "pairs_kept": len(pairs.pos),
        "pairs_total": pairs.total,
        "judge_model": judge_model or _judge_of(pos_csv),
        "pertoken_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    paths = vector_paths(save_dir, trait)
    for kind, path in paths.items():
        diff = (pos[kind] - neg[kind]).astype(np.float32)  # [n_layers + 1, hidden]
        save_vector(PersonaVector(diff, {**meta, "kind": kind}), path)
    return paths


def pair_rows(pos_csv, neg_csv, *, trait: str, threshold: float = 50, min_pairs: int = 1) -> Pairs:
    """Pair pos and neg rows by (i, k, j) and keep those that pass the filter."""
    pos = _keyed(pos_csv, trait, "pos")
    neg = _keyed(neg_csv, trait, "neg")
    if len(pos) != len(neg) or set(pos) != set(neg):
        only = sorted(set(pos) ^ set(neg))[:3]
        raise PertokenError(
            f"{pos_csv} ({len(pos)} rows) and {neg_csv} ({len(neg)} rows) do not pair up "
            f"(unmatched (question, instruction, sample): {only}): generate both with the same "
            "trait kit and --n-per-question"
        )
    keys = sorted(pos)
    kept = [key for key in keys if _keep(pos[key], neg[key], trait, threshold)]
    if len(kept) < max(min_pairs, 1):
        raise PertokenError(_too_few(len(kept), len(keys), pos, neg, trait, threshold))
    return Pairs([pos[k] for k in kept], [neg[k] for k in kept], len(keys))


def _keyed(path, trait: str, polarity: str) -> dict[tuple[int, int, int], dict]:
    header, rows = read_csv(path)
    for col in (trait, "coherence"):
        if col not in header:
            raise PertokenError(
                f"{path} has no {col!r} column: score it with `pertoken judge {path} "
                f"--trait {trait}` (or it was made for another trait)"
            )
    pattern = re.compile(rf"{re.escape(trait)}_(\d+)_(pos|neg)_(\d+)")
    out = {}
    for (qid, j), row in zip(sample_keys(rows), rows):
        m = pattern.fullmatch(qid)
        if not m:
            raise PertokenError(
                f"{path}: question_id {qid!r} is not an extraction row of {trait!r} "
                f"({trait}_I_{polarity}_K): pass the {polarity} CSV of this trait"
            )
        if m.group(2) != polarity:
            raise PertokenError(f"{path} holds {m.group(2)} rows where {polarity} rows belong")
        out[(int(m.group(1)), int(m.group(3)), j)] = row
    if len(out) != len(rows):
        raise PertokenError(f"{path} repeats some (question, instruction, sample) rows")
    return out


def _keep(pos: dict, neg: dict, trait: str, t: float) -> bool:
    s = [parse_score(x) for x in (pos[trait], neg[trait], pos["coherence"], neg["coherence"])]
    if any(x is None for x in s) or not pos["answer"] or not neg["answer"]:
        return False  # a missing score, or an empty answer with no tokens to average
    return s[0] >= t and s[1] < 100 - t and s[2] >= 50 and s[3] >= 50


def _too_few(kept, total, pos, neg, trait, t) -> str:
    def dist(rows, col):
        xs = [parse_score(r[col]) for r in rows.values()]
        ok = np.array([x for x in xs if x is not None])
        if not len(ok):
            return f"{col} all missing"
        q = np.percentile(ok, [10, 50, 90])
        return f"{col} p10/50/90 {q[0]:.0f}/{q[1]:.0f}/{q[2]:.0f} ({len(xs) - len(ok)} missing)"

    return (
        f"only {kept} of {total} pairs pass threshold {t:g} (pos {trait} >= {t:g}, neg {trait} "
        f"< {100 - t:g}, coherence >= 50): pos {dist(pos, trait)}, {dist(pos, 'coherence')}; "
        f"neg {dist(neg, trait)}, {dist(neg, 'coherence')}. Try a lower --threshold, more "
        "--n-per-question, or a larger model"
    )


def _mean_summaries(backend, rows: list[dict], batch_size: int, bar) -> dict[str, np.ndarray]:
    """Mean over rows of each per-sample summary, {kind: [n_layers + 1, hidden] float64}."""
    sums = {k: 0.0 for k in KINDS}
    chunk = max(batch_size, 1) * 8  # bounds memory: N x [n_layers + 1, hidden] per call
    for b in range(0, len(rows), chunk):
        part = rows[b : b + chunk]
        s = backend.summaries(
            [r["prompt"] for r in part], [r["answer"] for r in part], batch_size=batch_size
        )
        for k in KINDS:
            sums[k] = sums[k] + np.asarray(getattr(s, k), dtype=np.float64).sum(axis=0)
        bar.update(len(part))
    return {k: v / len(rows) for k, v in sums.items()}


def _judge_of(csv_path) -> str | None:
    from pertoken.pipeline.judge import judge_sidecar

    side = judge_sidecar(csv_path)
    try:
        return json.loads(side.read_text()).get("judge_model")
    except (OSError, json.JSONDecodeError):
        return None
