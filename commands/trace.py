"""Commands on per-token traces of whole datasets: trace, trace-stats, trace-diff."""

from __future__ import annotations

import click

from pertoken.commands import options
from pertoken.commands.options import (
    gather,
    generation_options,
    model_options,
    positions_option,
    ray_options,
)
from pertoken.pipeline.options import Generation, ModelChoice


@click.command()
@model_options()
@options.vectors_option(help="NAME=FILE.pt (repeatable).")
@click.option("--layers", required=True, help="Rows to project at, e.g. 8,12,16.")
@click.option(
    "--input", "input_path", required=True, type=click.Path(dir_okay=False),
    help=".csv (prompt, answer), .jsonl (chats), .txt or .json (prompts to answer).",
)  # fmt: skip
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Store folder.")
@click.option(
    "--segment", "segments", multiple=True,
    help="NAME=OPEN,CLOSE tag pair in assistant text (repeatable; default scratchpad and think).",
)  # fmt: skip
@click.option("--steer", "steers", multiple=True, help="Steer every pass: V.pt:LAYER:COEF.")
@options.operator_options
@positions_option
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--chunk", default=256, show_default=True, type=click.IntRange(min=1),
    help="Items saved together; a rerun resumes after the last saved chunk.",
)  # fmt: skip
@click.option("--no-page", is_flag=True, help="Do not write trace.html.")
@click.option(
    "--allow-special-tokens", is_flag=True,
    help="Message text such as <|eot_id|> is the template's control token (default: text).",
)  # fmt: skip
@generation_options(200)
@ray_options
@gather(choice=ModelChoice, generation=Generation)
def trace(choice, vectors, layers, input_path, out, segments, steers, ablates, caps, positions,
          chunk, no_page, allow_special_tokens, ray_address, workers, generation,
          system):  # fmt: skip
    """Project every token of a dataset's transcripts onto persona vectors, into a store."""
    from pertoken.commands.steering import _named_vectors
    from pertoken.pipeline.steer import build_steer, parse_specs
    from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
    from pertoken.pipeline.trace.segments import DEFAULT_SEGMENTS, parse_segment
    from pertoken.rows import parse_layers
    from pertoken.vectors import load_vector

    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    specs = parse_specs(steers, ablates, caps)
    segs = tuple(parse_segment(s) for s in segments) or DEFAULT_SEGMENTS
    rows = parse_layers(layers)
    if allow_special_tokens and ray_address:
        raise click.UsageError("--allow-special-tokens runs in one process: drop --ray for it")
    with options.model_or_pool(choice, ray_address, workers) as (bk, pool):
        if allow_special_tokens:  # inputs that hold real template tokens
            bk.special_tokens_in_content = True
        st = build_steer(bk, specs, positions=positions) if specs else None
        # --batch-size: sequences traced (and answers generated) at once
        g = generation.with_samples(1)
        tracing = Tracing(segs, st, g, system, g.batch_size, chunk, files, not no_page)
        res = trace_dataset(
            bk, input=input_path, out_dir=out, vectors=loaded, rows=rows, tracing=tracing,
            pool=pool,
        )  # fmt: skip
    rate = f", {res.tokens / res.seconds:.0f} tok/s" if res.tokens else ""
    click.echo(
        f"{res.out_dir}: {res.items} items ({res.traced} traced now, {res.tokens} tokens"
        f"{rate}) in tokens.parquet, items.parquet" + ("" if no_page else ", trace.html")
    )


def _stats_options(f):
    f = click.option("--top", default=10, show_default=True, type=click.IntRange(min=1),
                     help="Spans kept per list.")(f)  # fmt: skip
    return click.option("--span", default=8, show_default=True, type=click.IntRange(min=1),
                        help="Tokens per span.")(f)  # fmt: skip


@click.command(name="trace-stats")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--score", "scores", multiple=True, help="Score column (default: numeric ones).")
@_stats_options
@click.option("--out", default=None, help="Folder for the CSVs and PNGs (default STORE/stats).")
def trace_stats(store, scores, span, top, out):
    """Correlate per-item trace statistics with scores; decile curves; top spans."""
    from pertoken.pipeline.trace.stats import trace_stats as run_stats

    _report(run_stats(store, scores=list(scores), span=span, top=top, out_dir=out))


def _report(res, pair: tuple[str, int] | None = None) -> None:
    """Print trace-stats' tables; spans of `pair` (vector, row), else of the first pair."""
    from pertoken.pipeline.trace.report import format_correlations, format_spans

    if res.scores:
        click.echo(format_correlations(res))
    else:
        click.echo("no score columns: the items carry no numeric metadata (pass --score COL)")
    spans = [s for s in res.spans if pair is None or (s["vector"], s["layer"]) == tuple(pair)]
    click.echo(format_spans(spans))
    click.echo("wrote " + ", ".join(str(p) for p in res.files))


@click.command(name="trace-diff")
@click.argument("a_dir", type=click.Path(file_okay=False))
@click.argument("b_dir", type=click.Path(file_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for B - A.")
@_stats_options
def trace_diff(a_dir, b_dir, out, span, top):
    """Per-token differences B - A between two stores of the same transcripts."""
    from pertoken.pipeline.trace.diff import moved_most
    from pertoken.pipeline.trace.diff import trace_diff as run_diff
    from pertoken.pipeline.trace.stats import trace_stats as run_stats
    from pertoken.pipeline.trace.store import read_settings

    res = run_diff(a_dir, b_dir, out_dir=out)
    settings = read_settings(res.out_dir)
    found = moved_most(res, settings["vectors"], settings["rows"])
    for m in found:
        where = f"{m.vector}, layer {m.row}"
        if m.stat is None:
            click.echo(f"moved most ({where}): nothing moved")
            continue
        key = f"{m.stat}.{m.vector}.L{m.row}"
        what = "mean B - A" if m.stat == "mean" else "max |B - A| of a token"
        text = ", ".join(f"item {t['item']} {t[key]:+.3g}" for t in m.top)
        click.echo(f"moved most ({where}, {what}): {text}")
    if found[0].stat is None:
        click.echo("nothing moved: A and B agree at every vector and layer traced")
    _report(run_stats(out, span=span, top=top), (found[0].vector, found[0].row))
    click.echo(f"{res.out_dir}: {res.items} items of B - A, moved.csv, trace.html")


COMMANDS = [trace, trace_stats, trace_diff]
