"""trace-stats' figures: correlations per segment, and projection curves per score tercile."""

from __future__ import annotations

from pathlib import Path

from pertoken.atomic import save_figure_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_correlations(path: Path, rows: list[dict], score: str, vectors, layers) -> Path:
    """Pearson r of each segment's mean (and prompt_last) with `score`, a panel per vector."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(vectors), figsize=(5 + 2 * len(vectors), 3.6), squeeze=False)
    for ax, v in zip(axes[0], vectors):
        keep = [r for r in rows if r["vector"] == v and r["score"] == score]
        keep = [
            r for r in keep if r["stat"] in ("mean", "prompt_last") and r["pearson"] is not None
        ]
        names = list(dict.fromkeys(r["segment"] or "prompt_last" for r in keep))
        width = 0.8 / max(len(layers), 1)
        for j, layer in enumerate(layers):
            by = {r["segment"] or "prompt_last": r["pearson"] for r in keep if r["layer"] == layer}
            xs = [i + j * width for i in range(len(names))]
            ax.bar(xs, [by.get(n) or 0.0 for n in names], width, label=f"layer {layer}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set(ylim=(-1, 1), ylabel=f"Pearson r with {score}", title=v)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(path: Path, rows: list[dict], score: str, vectors, layers) -> Path:
    """Mean projection over answer deciles, a line per `score` tercile, a panel per vector x
    layer."""
    plt = _pyplot()
    n = len(vectors) * len(layers)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n + 1, 3.2), squeeze=False)
    panels = [(v, layer) for v in vectors for layer in layers]
    for ax, (v, layer) in zip(axes[0], panels):
        for t in dict.fromkeys(r["tercile"] for r in rows):  # low, mid, high as written
            pts = [
                r
                for r in rows
                if (r["score"], r["tercile"], r["vector"], r["layer"]) == (score, t, v, layer)
            ]
            if pts:
                lo, hi = pts[0]["score_min"], pts[0]["score_max"]
                ax.plot(
                    [r["decile"] for r in pts],
                    [r["mean"] for r in pts],
                    marker="o",
                    label=f"{t} {score} ({lo:g}-{hi:g})",
                )
        ax.set(xlabel="answer decile", ylabel="mean projection", title=f"{v}, layer {layer}")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)
    return path
