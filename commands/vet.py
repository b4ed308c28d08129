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
    "answers over their opposites and the cost on the model's own answers.",
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="Largest cost (nats per token on the model's own answers) of the suggested setting.",
)
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
):
    """Report card: per-layer norms, coefficients, held-out separation, warnings, best layer.

    Reads the per-sample summaries beside VECTOR (written by extract); the model runs when
    they are missing, and for the causal measure (--no-causal: separation only)."""
    from pertoken.pipeline.vet import vet_vector
    from pertoken.pipeline.vet_report import summary_lines

    r = vet_vector(
        vector,
        pos_csv=pos_csv,
        neg_csv=neg_csv,
        backend=functools.cache(lambda: options.load_model(model, backend, dtype, device)),
        model=model,
        trait=trait,
        out_dir=out,
        threshold=threshold,
        holdout=holdout,
        seed=seed,
        batch_size=batch_size,
        causal=causal,
        max_cost=max_cost,
    )
    for line in summary_lines(r):
        click.echo(line)
    click.echo(", ".join(r.files.values()))


COMMANDS = [vet]
