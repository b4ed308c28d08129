"""The vet command: a report card for a persona vector."""

from __future__ import annotations

import functools

import click

from pertoken.commands import options
from pertoken.commands.options import gather, model_options
from pertoken.pipeline.options import JudgeSettings, ModelChoice


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
@gather(choice=ModelChoice, judging=JudgeSettings)
def vet(vector, choice, pos_csv, neg_csv, trait, out, threshold, holdout, seed, batch_size,
        causal, max_cost, judged, judging):  # fmt: skip
    """Report card: per-layer norms, coefficients, held-out separation, warnings, best layer.

    Reads the per-sample summaries beside VECTOR (written by extract); the model runs when
    they are missing, and for the causal measure (--no-causal: separation only)."""
    from pertoken.pipeline.vet.stage import CausalCheck, Vetting, vet_vector
    from pertoken.pipeline.vet.write import summary_lines

    loader = functools.cache(lambda: options.load_model(choice))
    judge = _judge(vector, trait, judging, choice, loader) if judged else None
    r = vet_vector(
        vector,
        pos_csv=pos_csv,
        neg_csv=neg_csv,
        backend=loader,
        model=choice.model,
        vetting=Vetting(trait, out, threshold, holdout, seed, batch_size),
        causal=CausalCheck(max_cost, judged=judged, judge=judge) if causal or judged else None,
    )
    for line in summary_lines(r):
        click.echo(line)
    click.echo(", ".join(r.files.values()))


def _judge(vector, trait, judging: JudgeSettings, choice: ModelChoice, loader):
    from pertoken.pipeline.judge.judges import make_judge
    from pertoken.traits import load_trait
    from pertoken.vectors import load_vector

    kit = load_trait(trait or load_vector(vector).meta.get("trait") or "")
    return make_judge(kit, judging, model=choice, backend=loader)


COMMANDS = [vet]
