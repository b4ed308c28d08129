"""What trace-stats and trace-diff print: text tables (their figures: plots.py)."""

from __future__ import annotations

from pertoken.pipeline.trace.stats import StatsResult


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
