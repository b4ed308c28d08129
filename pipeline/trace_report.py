"""What trace-stats and trace-diff print and draw: text tables and matplotlib figures."""

from __future__ import annotations

from pathlib import Path

from pertoken.pipeline.trace_stats import TERCILES, StatsResult


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
    fig.savefig(path, dpi=110)
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
        for t in TERCILES:
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_correlations(result: StatsResult) -> str:
    """Per score: Pearson / Spearman r of each segment's mean projection and of prompt_last."""
    lines = []
    for score in result.scores:
        rows = [r for r in result.correlations if r["score"] == score]
        rows = [
            r for r in rows if r["stat"] in ("mean", "prompt_last") and r["pearson"] is not None
        ]
        if not rows:
            lines.append(f"no defined correlation with {score}")
            continue
        names = list(dict.fromkeys(r["segment"] or "prompt_last" for r in rows))
        lines.append(f"r with {score} (Pearson/Spearman) of the mean projection per segment:")
        lines.append(f"{'vector':<16}{'layer':>6}" + "".join(f"{n:>16}" for n in names))
        for v, layer in dict.fromkeys((r["vector"], r["layer"]) for r in rows):
            cells = {
                r["segment"] or "prompt_last": r
                for r in rows
                if (r["vector"], r["layer"]) == (v, layer)
            }
            text = [_pair(cells.get(n)) for n in names]
            lines.append(f"{v:<16}{layer:>6}" + "".join(f"{t:>16}" for t in text))
    return "\n".join(lines)


def _pair(row) -> str:
    if row is None:
        return "-"
    return f"{row['pearson']:+.2f}/{row['spearman']:+.2f}"


def format_spans(spans: list[dict], *, per_list: int = 3) -> str:
    """The top spans of the first vector x layer, highest and lowest."""
    if not spans:
        return "no answer spans to rank (the answers are shorter than --span)"
    v, layer = spans[0]["vector"], spans[0]["layer"]
    lines = [f"top spans ({v}, layer {layer}):"]
    for kind in ("high", "low"):
        for s in [s for s in spans if (s["vector"], s["layer"], s["kind"]) == (v, layer, kind)][
            :per_list
        ]:
            lines.append(
                f"  {kind:<4} {s['mean']:+8.3f}  item {s['item']} pos {s['pos']}: {s['text']!r}"
            )
    return "\n".join(lines)
