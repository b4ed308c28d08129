"""Extract: persona vectors as mean residuals of kept positive answers minus kept negative ones
(and, with method `probe`, a logistic-regression direction; see pipeline/probe.py).

Rows pair by (question i, instruction k, sample j); a pair is kept when
pos[trait] >= T, neg[trait] < 100 - T and both coherences >= 50 (docs/CONVENTIONS.md). The kept
samples' `response_avg` states are saved as `{trait}_summaries.npz` (pipeline/summaries.py).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.names import METHODS as METHODS  # the CLI's choices, numpy-free
from pertoken.paths import inside, path_name
from pertoken.pipeline.csvio import parse_score, read_csv, sample_keys
from pertoken.pipeline.options import Extraction
from pertoken.pipeline.summaries import KINDS, collect, from_pairs, save_summaries, summaries_path
from pertoken.vectors import PersonaVector, save_vector
from pertoken.version import __version__


@dataclass
class Pairs:
    pos: list[dict]  # kept rows, paired by index with neg
    neg: list[dict]
    total: int
    keys: list[tuple[int, int, int]] = field(default_factory=list)  # (i, k, j) per kept pair


def vector_paths(save_dir: str | Path, trait: str) -> dict[str, Path]:
    """{kind: save_dir/{trait}_{kind}_diff.pt}; a trait name that is not a plain name is refused."""
    path_name(trait, "trait name")
    return {k: inside(save_dir, f"{trait}_{k}_diff.pt") for k in KINDS}


def probe_path(save_dir: str | Path, trait: str) -> Path:
    """save_dir/{trait}_response_avg_probe.pt: the probe vector of `--method probe`."""
    path_name(trait, "trait name")
    return inside(save_dir, f"{trait}_response_avg_probe.pt")


def extract_vectors(
    backend,
    *,
    pos_csv: str | Path,
    neg_csv: str | Path,
    trait: str,
    save_dir: str | Path,
    extraction: Extraction = Extraction(),
    progress: bool = True,
) -> dict[str, Path]:
    """Write the three `{trait}_{kind}_diff.pt` vectors (+ JSON sidecars), the per-sample
    `{trait}_summaries.npz`, and with method "probe" `{trait}_response_avg_probe.pt`; return
    the vector paths ({kind: path}, plus "probe").

    extraction: the threshold T (default 50) that filters pairs, fewer than min_pairs kept
    pairs being an error; the method; pairs read at once. The sidecar names the judge
    recorded beside pos_csv.
    """
    from tqdm import tqdm

    trait = getattr(trait, "name", trait)
    threshold, method, batch_size = extraction.threshold, extraction.method, extraction.batch_size
    min_pairs = extraction.min_pairs
    if method not in METHODS:
        raise PertokenError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    paths = vector_paths(save_dir, trait)
    pairs = pair_rows(pos_csv, neg_csv, trait=trait, threshold=threshold, min_pairs=min_pairs)
    with output_lock(save_dir, folder=True):
        keep, total = ("response_avg",), len(pairs.pos) + len(pairs.neg)
        with tqdm(total=total, unit="row", desc="extract", disable=not progress) as bar:
            pos, pos_states = collect(backend, pairs.pos, keep=keep, batch_size=batch_size, bar=bar)
            neg, neg_states = collect(backend, pairs.neg, keep=keep, batch_size=batch_size, bar=bar)
        meta = _meta(backend, trait, threshold, pairs, _judged_by(pos_csv))
        samples = from_pairs(pairs.keys, pos_states, neg_states, _summary_meta(meta))
        save_summaries(samples, summaries_path(save_dir, trait))
        for kind, path in paths.items():
            diff = (pos[kind] - neg[kind]).astype(np.float32)  # [n_layers + 1, hidden]
            save_vector(PersonaVector(diff, {**meta, "kind": kind, "method": "mean_diff"}), path)
        if method == "probe":
            paths["probe"] = _save_probe(samples, meta, save_dir, trait)
    return paths


def _save_probe(samples, meta: dict, save_dir, trait: str) -> Path:
    from pertoken.pipeline.probe import probe_vectors

    probe = probe_vectors(samples.states["response_avg"], samples.label)  # [R, H]
    return save_vector(
        PersonaVector(probe, {**meta, "kind": "response_avg", "method": "probe"}),
        probe_path(save_dir, trait),
    )


def _meta(backend, trait: str, threshold: float, pairs: Pairs, judged_by: dict) -> dict:
    return {
        "model": backend.model_id,
        "model_type": getattr(backend, "model_type", None),
        "backend": backend.name,
        "dtype": backend.dtype,
        "trait": trait,
        "threshold": threshold,
        "pairs_kept": len(pairs.pos),
        "pairs_total": pairs.total,
        **judged_by,
        "pertoken_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _summary_meta(meta: dict) -> dict:
    return {k: meta[k] for k in ("model", "backend", "dtype", "trait", "threshold", "created")}


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
    return Pairs([pos[k] for k in kept], [neg[k] for k in kept], len(keys), kept)


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


def _judged_by(csv_path) -> dict:
    """The judge model, server and rubric digests the judge recorded beside `csv_path`."""
    from pertoken.pipeline.judge.stage import judge_sidecar

    try:
        side = json.loads(judge_sidecar(csv_path).read_text())
    except (OSError, json.JSONDecodeError):
        side = {}
    keys = ("judge_model", "judge_base_url", "rubric_sha256")
    return {k: side.get(k) for k in keys}
