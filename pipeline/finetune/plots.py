"""The figures of finetune, screen and shift: loss curve, projection-difference histograms,
shift against judged trait score."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pertoken.atomic import save_figure_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def loss_plot(losses: list[float], steps_per_epoch: int, path: str | Path) -> Path:
    """Loss per step, its running mean, and the epoch boundaries."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, lw=0.8, alpha=0.5, label="step")
    k = max(1, len(losses) // 20)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(x[k - 1 :], smooth, lw=2, label=f"mean of {k}")
    for e in range(steps_per_epoch, len(losses), steps_per_epoch):
        ax.axvline(e + 0.5, color="grey", lw=0.5, ls=":")
    ax.set(xlabel="step", ylabel="loss (assistant tokens)", title="finetuning loss")
    ax.legend()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def diff_histogram(diffs: dict[str, np.ndarray], layer: int, path: str | Path) -> Path:
    """One histogram of proj_diff per vector, with the dataset mean marked."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(diffs), figsize=(5 * len(diffs), 3.6), squeeze=False, constrained_layout=True
    )
    for ax, (name, d) in zip(axes[0], diffs.items()):
        ax.hist(d, bins=min(40, max(5, len(d) // 3)), color="tab:blue", alpha=0.8)
        ax.axvline(float(np.mean(d)), color="tab:red", label=f"mean {np.mean(d):.3g}")
        ax.axvline(0, color="black", lw=0.6)
        ax.set(xlabel="proj_diff (data - model)", ylabel="samples", title=f"{name} layer {layer}")
        ax.legend()
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


def shift_plot(points: list[tuple[str, float, float]], trait: str, r, path: str | Path) -> Path:
    """Judged trait score against the shift, one point per model (name, shift, score)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5), constrained_layout=True)
    for name, shift, score in points:
        ax.scatter([shift], [score])
        ax.annotate(name, (shift, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    title = f"r = {r:.2f}" if r is not None else "r: needs 3 models"
    ax.set(xlabel="shift along the persona vector", ylabel=f"judged {trait}", title=title)
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)
