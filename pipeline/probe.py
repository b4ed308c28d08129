"""Probe: a persona vector from a linear probe instead of a mean difference.

Per row, an L2-regularised logistic regression (scikit-learn, C = 1) separates the positive
answers' `response_avg` states from the negative ones. Each row is standardised first (zero mean,
unit variance per dimension), so a few huge dimensions (massive activations) neither dominate the
fit nor its penalty. The weights w of the standardised fit map back to the residual space as
w / scale, the direction in which the probe's logit grows fastest. That unit direction u is
scaled by the mean difference d's projection on it, v = u (d . u): `coef * v` moves an answer
along u as far as coef times the distance between the two classes along u, so a probe vector's
coefficients mean what a mean-difference vector's do.
"""

from __future__ import annotations

import numpy as np

C = 1.0  # inverse L2 strength, on standardised features


def probe_vectors(states: np.ndarray, label: np.ndarray, *, c: float = C) -> np.ndarray:
    """[N, R, H] states and [N] labels (1 pos, 0 neg) -> [R, H] float32 probe vector."""
    return np.stack([probe_row(states[:, r], label, c=c) for r in range(states.shape[1])])


def probe_row(x: np.ndarray, label: np.ndarray, *, c: float = C) -> np.ndarray:
    """[N, H] states of one row -> [H] float32; zero when the two sides do not differ."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x = np.asarray(x, dtype=np.float64)
    label = np.asarray(label)
    diff = x[label == 1].mean(0) - x[label == 0].mean(0)  # [H]
    if not np.any(diff):
        return np.zeros(x.shape[1], np.float32)  # identical sides: nothing to separate
    scaler = StandardScaler().fit(x)
    fit = LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(x), label)
    w = fit.coef_[0] / scaler.scale_  # [H], back in the residual space
    norm = np.linalg.norm(w)
    if norm == 0:
        return np.zeros(x.shape[1], np.float32)
    u = w / norm
    return (u * (diff @ u)).astype(np.float32)
