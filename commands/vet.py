"""The vet command: a report card for a persona vector."""

from __future__ import annotations

import functools

import click

from pertoken.commands import options
from pertoken.commands.options import model_options


@click.command()
@click.argument("vector", type=click.Path(dir_okay=False))
@model_options()
@click.option("--pos", "pos_csv", required=True, type=click.Path(dir_okay=False))
@click.option("--neg", "neg_csv", required=True, type=click.Path(dir_okay=False))
@click.option("--trait", "-t", default=None, help="Trait column (default: the vector's).")
@click.option("--out", "-o", default=None, type=click.Path(file_okay=False), help="Report folder.")
@click.option("--threshold", type=float, default=None, help="Pair cut T (default: the vector's).")
@click.option("--holdout", default=0.3, show_default=True, help="Share of questions held out.")
@click.option("--seed", default=0, show_default=True, help="Seed of the held-out split.")
@click.option("--batch-size", default=8, show_default=True)
@click.option(
    "--causal/--no-causal",
    default=True,
    show_default=True,
    help="Rank rows by what steering does: per row, the teacher-forced gain of held-out trait "
    "answers over their opposites, its cost on them and on the model's own answers, and a "
    "greedy loop check.",
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Largest trait cost (nats per token lost on held-out trait answers) of the suggestion.",
)
@click.option(
    "--judged",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Judge steered answers to the held-out questions at this many top causal settings "
    "(and unsteered), in one generate call; needs the trait's kit and a judge.",
)
@options.judge_options
@options.cache_option
def vet(
    vector,
    model,
    backend,
    dtype,
    device,
    pos_csv,
    neg_csv,
    trait,
    out,
    threshold,
    holdout,
    seed,
    batch_size,
    causal,
    max_cost,
    judged,
    judge_model,
    base_url,
    concurrency,
    coherence_prompt,
    max_consecutive_failures,
    cache,
):
    """Report card: per-layer norms, coefficients, held-out separation, warnings, best layer.

    Reads the per-sample summaries beside VECTOR (written by extract); the model runs when
    they are missing, and for the causal measure (--no-causal: separation only)."""
    from pertoken.pipeline.vet import vet_vector
    from pertoken.pipeline.vet_report import summary_lines

    loader = functools.cache(lambda: options.load_model(model, backend, dtype, device))
    judge = None
    if judged:
        judge = _judge(vector, trait, judge_model, base_url, concurrency, coherence_prompt,
                       max_consecutive_failures, cache, model, loader, backend)  # fmt: skip
    r = vet_vector(
        vector,
        pos_csv=pos_csv,
        neg_csv=neg_csv,
        backend=loader,
        model=model,
        trait=trait,
        out_dir=out,
        threshold=threshold,
        holdout=holdout,
        seed=seed,
        batch_size=batch_size,
        causal=causal or bool(judged),
        max_cost=max_cost,
        judged=judged,
        judge=judge,
    )
    for line in summary_lines(r):
        click.echo(line)
    click.echo(", ".join(r.files.values()))


def _judge(vector, trait, judge_model, base_url, concurrency, coherence_prompt, failures, cache,
           model, loader, backend_name):  # fmt: skip
    from pertoken.pipeline.judge import read_rubric
    from pertoken.pipeline.judges import make_judge
    from pertoken.traits import load_trait
    from pertoken.vectors import load_vector

    kit = load_trait(trait or load_vector(vector).meta.get("trait") or "")
    return make_judge(
        kit,
        judge_model=judge_model,
        base_url=base_url,
        concurrency=concurrency,
        max_consecutive_failures=failures,
        coherence_prompt=read_rubric(coherence_prompt) if coherence_prompt else None,
        cache=cache,
        model=model,
        backend=loader,
        backend_name=backend_name,
    )


COMMANDS = [vet]
