"""Write a VetReport as `{trait}_report.json`, `.md` and `.png` (the per-row curves)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from pertoken.atomic import save_figure_atomic, write_text_atomic
from pertoken.pipeline.vet.card import VetReport


def write_report(report: VetReport, paths: dict[str, Path]) -> None:
    """Write json, md and png to paths[ext]; the paths are recorded in report.files."""
    report.files = {ext: str(p) for ext, p in paths.items()}
    paths["json"].parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        paths["json"], json.dumps(_finite(dataclasses.asdict(report)), indent=2) + "\n"
    )
    write_text_atomic(paths["md"], to_markdown(report))
    plot_report(report, paths["png"])


def _finite(x):
    """JSON has no inf or nan: they become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _num(x: float | None, fmt: str = ".3g") -> str:
    return "-" if x is None else format(x, fmt)


def summary_lines(report: VetReport) -> list[str]:
    """The suggestion and the warnings, one line each (printed by the CLI)."""
    lines = []
    if report.suggested_ratio is not None:
        r, k = report.row(report.suggested_row), report.suggested_ratio
        how = "judged best" if report.causal.get("judged_pick") else "best causal gain"
        tc = "" if r.trait_cost is None else f", trait cost {r.trait_cost[k]:+.3f}"
        loops = ""
        if r.distinct and k in r.distinct:
            loops = f", distinct {r.distinct[k]:.2f} at {report.causal['loop_margin']:g}x"
        lines.append(
            f"suggested layer {r.row}, coef {_num(report.suggested_coef)} (coef*|v|/|h| = {k}, "
            f"{how}): causal gain {r.gain[k]:+.3f}{tc}, own cost {r.cost[k]:+.3f} nats/token "
            f"on held-out answers{loops} (held-out AUROC {r.auroc:.3f})"
        )
    elif report.suggested_row is not None:
        r = report.row(report.suggested_row)
        c = r.coef
        lines.append(
            f"suggested layer {r.row}: held-out AUROC {r.auroc:.3f}, Cohen's d "
            f"{_num(r.cohens_d, '.2f')}; coef {_num(c['0.25'])} / {_num(c['0.5'])} / "
            f"{_num(c['1'])} gives coef*|v|/|h| = 0.25 / 0.5 / 1"
        )
    for j in report.judged:
        where = "unsteered" if j["row"] is None else f"layer {j['row']} coef {_num(j['coef'])}"
        lines.append(
            f"judged {where}: {report.trait} {_num(j['trait'], '.1f')}, coherence "
            f"{_num(j['coherence'], '.1f')} (n {j['n']})"
        )
    return lines + [f"warning: {w}" for w in report.warnings]


def to_markdown(report: VetReport) -> str:
    sp = report.split
    held, train = sp["held_out_questions"], sp["train_questions"]
    out = [
        f"# Report card: {Path(report.vector).name}",
        "",
        f"Model `{report.model}`, trait `{report.trait}`, method `{report.method}`, kind "
        f"`{report.kind}`, {report.pairs} kept pairs. Held out: questions "
        f"{', '.join(map(str, held))} ({sp['held_out_pairs']} pairs); the vector was "
        f"re-extracted on the other {len(train)} questions ({sp['train_pairs']} pairs).",
        "",
        *(f"**{line}**" if i == 0 else f"- {line}" for i, line in enumerate(summary_lines(report))),
        "",
        "| row | \\|v\\| | \\|h\\| | coef @0.25 | coef @0.5 | coef @1 | AUROC | Cohen's d "
        "| cos(next row) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in report.rows:
        c = r.coef
        out.append(
            f"| {r.row} | {r.v_norm:.4g} | {r.h_norm:.4g} | {_num(c['0.25'])} | {_num(c['0.5'])} "
            f"| {_num(c['1'])} | {r.auroc:.3f} | {_num(r.cohens_d, '.2f')} "
            f"| {_num(r.cos_next, '.3f')} |"
        )
    tables = _causal_table(report) + _judged_table(report) + _other_table(report)
    return "\n".join(out + tables) + "\n"


def _judged_table(report: VetReport) -> list[str]:
    if not report.judged:
        return []
    out = ["", "Judged steering check (held-out questions, greedy, one generate call):", ""]
    out += [
        "| row | ratio | coef | trait | coherence | n |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for j in report.judged:
        row = "unsteered" if j["row"] is None else j["row"]
        out.append(
            f"| {row} | {j['ratio'] or '-'} | {_num(j['coef'])} | {_num(j['trait'], '.1f')} "
            f"| {_num(j['coherence'], '.1f')} | {j['n']} |"
        )
    return out


def _causal_table(report: VetReport) -> list[str]:
    if not report.causal:
        return []
    c = report.causal
    ratios = ("0.25", "0.5", "1")
    loops = "loop_margin" in c
    out = [
        "",
        f"What steering does (teacher-forced, {c['pairs']} held-out pairs and the model's own "
        f"answers to {c['questions']} held-out questions, up to {c['tokens']} tokens each), "
        "nats per token: gain = rise of the trait answers' log-likelihood over their "
        "opposites'; trait cost = loss on the trait answers themselves (damage, not the "
        "trait); own cost = loss on the model's own unsteered answers (it moves with the "
        "gain when the trait changes the whole answer).",
    ]
    if loops:
        out.append(
            f"Loop check: distinct = share of distinct token trigrams of greedy answers to "
            f"those questions steered at {c['loop_margin']:g}x the coefficient (unsteered "
            f"{_num(c.get('distinct_unsteered'), '.2f')}; '-' = not checked: no gain, or "
            "outside the trait-cost bound)."
        )
    out.append(
        f"Suggested: the largest gain with trait cost <= {c['max_cost']:g}"
        + (
            f" and distinct >= {c['min_distinct']:.2f} ({c['loop_share']:g}x the unsteered)."
            if loops
            else "."
        )
    )
    cols = [f"gain @{k}" for k in ratios] + [f"trait cost @{k}" for k in ratios]
    cols += [f"own cost @{k}" for k in ratios] + ([f"distinct @{k}" for k in ratios] * loops)
    out += ["", "| row | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for r in report.rows:
        if r.gain is None:
            continue
        cells = [_num(r.gain.get(k), "+.3f") for k in ratios]
        cells += [_num((r.trait_cost or {}).get(k), "+.3f") for k in ratios]
        cells += [_num(r.cost.get(k), "+.3f") for k in ratios]
        cells += [_num((r.distinct or {}).get(k), ".2f") for k in ratios] * loops
        out.append(f"| {r.row} | " + " | ".join(cells) + " |")
    return out


def _other_table(report: VetReport) -> list[str]:
    if not report.other_vectors:
        return []
    names = list(report.other_vectors)
    out = ["", "Cosine with the other vectors in the folder, per row:", ""]
    out += ["| row | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for r in report.rows:
        cells = [_num(report.other_vectors[n][r.row], ".3f") for n in names]
        out.append(f"| {r.row} | " + " | ".join(cells) + " |")
    return out


def plot_report(report: VetReport, path: Path) -> None:
    """Separation, norms, coefficients and cosines against the row, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rows = [r.row for r in report.rows]
    n = 3 if report.causal else 2
    fig, ax = plt.subplots(n, 2, figsize=(11, 3.5 * n), constrained_layout=True)
    _plot_separation(ax[0, 0], report, rows)
    ax[0, 1].plot(rows, [r.v_norm for r in report.rows], marker="o", label="|v|")
    ax[0, 1].plot(rows, [r.h_norm for r in report.rows], marker="s", label="mean |h|")
    ax[0, 1].set(title="norms", xlabel="layer (row)", yscale="log")
    for ratio in ("0.25", "0.5", "1"):
        pts = [(r.row, r.coef[ratio]) for r in report.rows if r.coef[ratio]]
        if pts:
            ax[1, 0].plot(*zip(*pts), marker="o", label=f"coef*|v|/|h| = {ratio}")
    ax[1, 0].set(title="coefficient for a given coef*|v|/|h|", xlabel="layer (row)", yscale="log")
    _plot_cosines(ax[1, 1], report, rows)
    if report.causal:
        _plot_causal(ax[2, 0], ax[2, 1], report)
    for a in ax.flat:
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
        if a.lines:
            a.legend(fontsize=8)
    fig.suptitle(f"{Path(report.vector).name}: report card")
    save_figure_atomic(fig, path, dpi=110)
    plt.close(fig)


def _plot_separation(ax, report: VetReport, rows: list[int]) -> None:
    mid = report.middle_rows
    ax.axvspan(min(mid) - 0.5, max(mid) + 0.5, color="0.9", label="25-75% of depth")
    ax.plot(rows, [r.auroc for r in report.rows], marker="o", label="held-out AUROC")
    if report.suggested_row is not None:
        ax.axvline(report.suggested_row, color="tab:red", ls="--", label="suggested")
    ax.set(title="held-out separation", xlabel="layer (row)", ylabel="AUROC", ylim=(0.4, 1.02))
    d = [r.cohens_d if math.isfinite(r.cohens_d) else float("nan") for r in report.rows]
    twin = ax.twinx()
    twin.plot(rows, d, color="tab:green", marker=".", ls=":")
    twin.set_ylabel("Cohen's d (dotted)", color="tab:green")


def _plot_causal(gain_ax, cost_ax, report: VetReport) -> None:
    cards = [r for r in report.rows if r.gain is not None]
    for i, ratio in enumerate(("0.25", "0.5", "1")):
        pts = [r for r in cards if ratio in r.gain]
        if not pts:
            continue
        x, color = [r.row for r in pts], f"C{i}"
        gain_ax.plot(x, [r.gain[ratio] for r in pts], marker="o", color=color,
                     label=f"ratio {ratio}")  # fmt: skip
        if all(r.trait_cost for r in pts):
            cost_ax.plot(x, [r.trait_cost[ratio] for r in pts], marker="o", color=color,
                         label=f"trait cost, ratio {ratio}")  # fmt: skip
        cost_ax.plot(x, [r.cost[ratio] for r in pts], ls=":", color=color, alpha=0.6,
                     label=f"own cost, ratio {ratio}")  # fmt: skip
        looped = [r.row for r in pts if r.distinct is not None and r.distinct.get(ratio, 1)
                  < report.causal.get("min_distinct", 0)]  # fmt: skip
        if looped:
            ys = [r.gain[ratio] for r in pts if r.row in looped]
            gain_ax.scatter(looped, ys, marker="x", s=60, color="k", zorder=3)
    gain_ax.scatter([], [], marker="x", color="k", label="loops (greedy check)")
    cost_ax.axhline(report.causal["max_cost"], color="0.5", ls="--", label="trait-cost bound")
    cost_ax.set_yscale("symlog", linthresh=1.0)
    for a in (gain_ax, cost_ax):
        if report.suggested_row is not None:
            a.axvline(report.suggested_row, color="tab:red", ls="--", label="suggested")
    gain_ax.set(title="causal gain (nats/token)", xlabel="layer (row)")
    cost_ax.set(title="cost: trait answers (solid), own answers (dotted)", xlabel="layer (row)")


def _plot_cosines(ax, report: VetReport, rows: list[int]) -> None:
    nxt = [(r.row + 0.5, r.cos_next) for r in report.rows if r.cos_next is not None]
    if nxt:
        ax.plot(*zip(*nxt), marker="o", label="row vs next row")
    for name, cos in list(report.other_vectors.items())[:8]:
        pts = [(r, c) for r, c in zip(rows, cos) if c is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.set(title="cosines", xlabel="layer (row)", ylim=(-1.05, 1.05))
