"""The summary of a sweep's settings (Point: means with 95% intervals, n, missing scores),
summary.csv, and the plot that shows them with n, the coherence floor and the pick."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from pertoken.atomic import save_figure_atomic
from pertoken.pipeline.csvio import parse_score, write_csv_atomic


@dataclass
class Point:
    """One steering setting's judged answers: means, 95% interval half-widths, count."""

    layer: int
    coef: float
    trait: float | None
    trait_ci: float | None  # half-width of the 95% t-interval (None below 2 scores)
    coherence: float | None
    coherence_ci: float | None
    n: int  # answers
    missing: int  # answers without a trait score


def interval(values: list[float]) -> tuple[float | None, float | None]:
    """(mean, half-width of its 95% t-interval); None where there are too few values."""
    from scipy import stats

    n = len(values)
    if n == 0:
        return None, None
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (n - 1))
    return mean, float(stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n))


def point(layer: int, coef: float, rows: list[dict], trait: str) -> Point:
    """The Point of one setting's rows (scores that are missing are left out)."""
    t = [x for x in (parse_score(r[trait]) for r in rows) if x is not None]
    c = [x for x in (parse_score(r["coherence"]) for r in rows) if x is not None]
    return Point(layer, coef, *interval(t), *interval(c), len(rows), len(rows) - len(t))


def summarize(rows: list[dict], trait: str) -> list[Point]:
    """One Point per (layer, coef) of these rows, sorted by layer then coef."""
    groups: dict[tuple[int, float], list[dict]] = {}
    for r in rows:
        groups.setdefault((int(r["layer"]), float(r["coef"])), []).append(r)
    return [point(layer, coef, group, trait) for (layer, coef), group in sorted(groups.items())]


def write_summary(path: Path, trait: str, points: list[Point]) -> None:
    """summary.csv: `layer, coef, {trait}, coherence, n, missing`, means to two decimals."""
    header = ["layer", "coef", trait, "coherence", "n", "missing"]
    rows = [
        {"layer": p.layer, "coef": p.coef, trait: fmt(p.trait), "coherence": fmt(p.coherence),
         "n": p.n, "missing": p.missing}
        for p in points
    ]  # fmt: skip
    write_csv_atomic(path, header, rows)


def fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def plot_points(
    path: Path, trait: str, points: list[Point], *, floor: float | None = None, best=None
) -> None:
    """Trait score and coherence vs coef, one line per layer, with 95% intervals, n at each
    point, the coherence floor as a dashed line and the picked setting as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), constrained_layout=True)
    for ax, key, title in ((axes[0], "trait", trait), (axes[1], "coherence", "coherence")):
        for k, layer in enumerate(sorted({p.layer for p in points})):
            pts = sorted(
                (p for p in points if p.layer == layer and getattr(p, key) is not None),
                key=lambda p: p.coef,
            )
            if not pts:
                continue
            ys = [getattr(p, key) for p in pts]
            err = [getattr(p, f"{key}_ci") or 0.0 for p in pts]
            bars = ax.errorbar(
                [p.coef for p in pts], ys, yerr=err, marker="o", capsize=3, label=f"layer {layer}"
            )
            for p, y in zip(pts, ys):
                ax.annotate(
                    f"n={p.n}",
                    (p.coef, y),
                    textcoords="offset points",
                    xytext=(4, 4 - 12 * (k % 2)),
                    fontsize=7,
                    color=bars[0].get_color(),
                )
        if best is not None and getattr(best, key) is not None:
            ax.plot(
                [best.coef], [getattr(best, key)], "*", ms=16, color="gold", mec="k", label="picked"
            )
        if key == "coherence" and floor is not None:
            ax.axhline(floor, color="tab:red", ls="--", label=f"floor {floor:g}")
        ax.set(
            xlabel="steering coefficient", ylabel=f"mean {title} score", title=title, ylim=(-2, 102)
        )
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    save_figure_atomic(fig, path, dpi=120)
    plt.close(fig)
