"""Projections onto persona vectors (docs/CONVENTIONS.md): proj = h . v / |v|,
cos = h . v / (|h| |v|).

One place for the math, shared by per-token monitoring and CSV projection columns.
"""

from __future__ import annotations

import numpy as np

from pertoken.errors import PertokenError


def _norm(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1)
    if np.any(n == 0):
        raise PertokenError("a persona vector row is all zeros: it has no direction to project on")
    return n


def project(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scalar projection of h [..., hidden] onto v [hidden] (or [..., hidden], broadcast)."""
    h64, v64 = np.asarray(h, np.float64), np.asarray(v, np.float64)
    return np.sum(h64 * v64, axis=-1) / _norm(v64)


def cosine(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Cosine similarity of h [..., hidden] and v [hidden]; 0 where h is all zeros."""
    h64, v64 = np.asarray(h, np.float64), np.asarray(v, np.float64)
    hn = np.linalg.norm(h64, axis=-1)
    dots = np.sum(h64 * v64, axis=-1)
    return np.divide(dots, hn * _norm(v64), out=np.zeros_like(dots), where=hn > 0)


def project_rows(hidden: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token projections and cosines onto several vectors at several rows.

    hidden: [T, L, hidden] (one row per layer); directions: [K, L, hidden] (vector k at layer l).
    Returns (proj, cos), each [T, K, L] float64.
    """
    h = np.asarray(hidden, np.float64)[:, None, :, :]  # [T, 1, L, hidden]
    d = np.asarray(directions, np.float64)[None, :, :, :]  # [1, K, L, hidden]
    return project(h, d), cosine(h, d)
