"""The numbers of a vector's report card, from per-sample states: held-out separation on a
split that holds out whole questions, residual norms, massive activations and cosines."""

from __future__ import annotations

import math

import numpy as np

from pertoken.errors import PertokenError

RATIOS = (0.25, 0.5, 1.0)  # coef * |v| / |h| values the report gives a coefficient for
MASSIVE_RATIO = 20.0  # a dimension is massive when its rms is this many times the median's
MASSIVE_SHARE = 0.25  # ... and the massive dimensions of a row hold this much of |h|^2
TINY = 1e-3  # a direction shorter than TINY * |h| is float noise, not a direction


def question_split(question: np.ndarray, *, holdout: float = 0.3, seed: int = 0):
    """(train, test) sample indices with `holdout` of the questions held out whole."""
    from sklearn.model_selection import GroupShuffleSplit

    n_questions = len(np.unique(question))
    if not 0 < holdout < 1:
        raise PertokenError(f"--holdout must be between 0 and 1, not {holdout:g}")
    if n_questions < 2:
        raise PertokenError(
            f"the kept pairs come from {n_questions} question(s), and a held-out split needs at "
            "least 2: generate with more questions or lower --threshold"
        )
    split = GroupShuffleSplit(n_splits=1, test_size=holdout, random_state=seed)
    try:
        return next(split.split(np.zeros(len(question)), groups=question))
    except ValueError:  # holdout rounds to all questions or none
        raise PertokenError(
            f"--holdout {holdout:g} of {n_questions} questions leaves one side empty: "
            "choose a holdout between 1/n and 1 - 1/n of the questions"
        ) from None


def direction(x: np.ndarray, label: np.ndarray, method: str) -> np.ndarray:
    """[N, H] states of one row -> [H] direction, by the vector's own method."""
    if method == "probe":
        from pertoken.pipeline.probe import probe_row

        return probe_row(x, label)
    x = np.asarray(x, dtype=np.float64)
    return x[label == 1].mean(0) - x[label == 0].mean(0)


def project(x: np.ndarray, v: np.ndarray, h_norm: float) -> np.ndarray:
    """[N] projections h . v / |v|; all zero when v is too short to be a direction."""
    norm = float(np.linalg.norm(v))
    if norm <= TINY * h_norm or norm == 0:
        return np.zeros(len(x))
    return np.asarray(x, dtype=np.float64) @ (np.asarray(v, np.float64) / norm)


def cohens_d(pos: np.ndarray, neg: np.ndarray) -> float:
    """(mean pos - mean neg) / pooled sd; 0 for two equal constants, +-inf for two different."""
    n1, n2 = len(pos), len(neg)
    var = ((n1 - 1) * np.var(pos, ddof=1) + (n2 - 1) * np.var(neg, ddof=1)) / (n1 + n2 - 2)
    diff = float(np.mean(pos) - np.mean(neg))
    if var > 0:
        return diff / math.sqrt(var)
    return 0.0 if diff == 0 else math.copysign(math.inf, diff)


def separation(scores: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(AUROC, Cohen's d) of scores for label 1 against label 0 (a constant scores 0.5, 0)."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(label, scores)), cohens_d(scores[label == 1], scores[label == 0])


def heldout_separation(states, label, train, test, *, method: str, h_norm: np.ndarray):
    """Per row: the direction re-extracted on `train`, then (AUROC, d) of `test` projected on
    it. states [N, R, H]; returns two [R] float arrays."""
    rows = states.shape[1]
    auroc, d = np.zeros(rows), np.zeros(rows)
    for r in range(rows):
        x = states[:, r].astype(np.float32)  # [N, H]
        v = direction(x[train], label[train], method)
        auroc[r], d[r] = separation(project(x[test], v, h_norm[r]), label[test])
    return auroc, d


def mean_norms(states: np.ndarray) -> np.ndarray:
    """[R] mean over samples of |h| per row, states [N, R, H]."""
    return np.array(
        [
            np.nanmean(np.linalg.norm(states[:, r].astype(np.float32), axis=1))
            for r in range(states.shape[1])
        ]
    )


def coefs_at(v_norm: np.ndarray, h_norm: np.ndarray) -> dict[float, list[float | None]]:
    """{ratio: per-row coef with coef * |v| / |h| = ratio} (None where |v| is zero)."""
    ok = v_norm > TINY * h_norm
    safe = np.where(ok, v_norm, 1.0)
    return {
        ratio: [float(c) if k else None for c, k in zip(ratio * h_norm / safe, ok)]
        for ratio in RATIOS
    }


def massive_dims(states: np.ndarray) -> dict[int, list[tuple[int, float]]]:
    """{row: [(dim, share of mean |h|^2), ...]} for rows where a few dimensions dominate |h|:
    dimensions whose rms is >= MASSIVE_RATIO x the median's, together >= MASSIVE_SHARE."""
    out = {}
    for r in range(states.shape[1]):
        rms = np.sqrt(np.nanmean(states[:, r].astype(np.float32) ** 2, axis=0))  # [H]
        total, med = float((rms**2).sum()), float(np.median(rms))
        dims = np.flatnonzero(rms >= MASSIVE_RATIO * med) if med > 0 else []
        share = {int(k): float(rms[k] ** 2 / total) for k in dims}
        if share and sum(share.values()) >= MASSIVE_SHARE:
            out[r] = sorted(share.items(), key=lambda kv: -kv[1])
    return out


def cosines(a: np.ndarray, b: np.ndarray) -> list[float | None]:
    """Row-wise cosine of two [R, H] arrays (None where a row is zero)."""
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dots = (a.astype(np.float64) * b).sum(axis=1)
    return [float(x / (p * q)) if p > 0 and q > 0 else None for x, p, q in zip(dots, na, nb)]


def middle_rows(n_layers: int) -> list[int]:
    """Rows within 25-75% of depth, never rows 0 and 1 (all steerable rows on tiny models)."""
    rows = [r for r in range(2, n_layers + 1) if 0.25 * n_layers <= r <= 0.75 * n_layers]
    return rows or list(range(1, n_layers + 1))


def suggest_row(auroc: np.ndarray, d: np.ndarray, rows: list[int]) -> int:
    """The best held-out separation among `rows`: AUROC, then Cohen's d on ties."""
    return max(rows, key=lambda r: (round(float(auroc[r]), 6), float(d[r])))
