"""Commands of the extraction pipeline: traits, generate, judge, extract, run."""

from __future__ import annotations

from dataclasses import replace

import click

from pertoken.commands import options
from pertoken.commands.options import (
    BATCH_HELP,
    backend_option,
    cache_option,
    compile_option,
    gather,
    judge_options,
    method_option,
    model_options,
    ray_options,
    sampler_option,
    trait_option,
)
from pertoken.errors import PertokenError
from pertoken.pipeline.generate import POLARITIES
from pertoken.pipeline.options import Extraction, Generation, JudgeSettings, ModelChoice


@click.group()
def traits():
    """List and show trait kits."""


@traits.command(name="list")
def traits_list():
    """The bundled trait kits."""
    from pertoken.traits import list_traits, load_trait

    for name in list_traits():
        t = load_trait(name)
        summary = t.description.split(". ")[0]
        click.echo(f"{name:18s} {summary[:90] + '...' if len(summary) > 90 else summary}")


@traits.command(name="show")
@click.argument("name")
def traits_show(name):
    """A kit's instructions, questions and rubric (NAME: bundled name or JSON path)."""
    from pertoken.traits import load_trait

    t = load_trait(name)
    click.echo(f"{t.name} ({t.assistant_name}) from {t.source}\n{t.description}\n")
    for k, pair in enumerate(t.instructions):
        click.echo(f"instruction {k}\n  pos: {pair['pos']}\n  neg: {pair['neg']}")
    for title, qs in (("questions", t.questions), ("eval questions", t.eval_questions)):
        click.echo(f"\n{title} ({len(qs)})")
        for i, q in enumerate(qs):
            click.echo(f"  {i:2d}. {q}")
    click.echo(f"\njudge rubric\n{t.eval_prompt}")


@click.command()
@model_options()
@trait_option
@click.option("--polarity", type=click.Choice(POLARITIES), default="pos", show_default=True)
@click.option("--eval", "eval_", is_flag=True, help="Eval questions, no system instruction.")
@click.option("--n-per-question", default=10, show_default=True, help="Samples per prompt.")
@click.option("--max-new-tokens", default=1000, show_default=True)
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@sampler_option
@click.option("--batch-size", type=int, default=None, help=BATCH_HELP)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
@compile_option
@ray_options
@gather(choice=ModelChoice, generation=Generation)
def generate(choice, generation, trait, polarity, eval_, out, ray_address, workers):
    """Answer a trait's questions under its positive or negative instructions."""
    from pertoken.lock import output_lock
    from pertoken.pipeline.generate import generate_csv, is_complete, plan_rows
    from pertoken.traits import load_trait

    kit = load_trait(trait)
    specs = plan_rows(kit, polarity=polarity, eval=eval_, n_per_question=generation.samples)
    if is_complete(out, specs):  # nothing to do: do not load the model
        return click.echo(f"{out}: all {len(specs)} rows are already there")
    batch_size = generation.batch_size or _memory_batch(choice, generation.max_tokens)
    generation = replace(generation, batch_size=batch_size)
    loaded = options.model_or_pool(choice, ray_address, workers)
    with output_lock(out), loaded as (bk, pool):  # locked first: a second writer stops at once
        polarity = "eval" if eval_ else polarity
        r = generate_csv(bk, kit, out, generation, polarity=polarity, pool=pool)
    click.echo(f"{r.path}: {r.rows} rows ({r.generated} generated now, {r.seconds:.1f}s)")
    options.report_compile(bk)


@click.command()
@click.argument("csv_file", type=click.Path(dir_okay=False))
@trait_option
@judge_options
@backend_option(help="Backend of a local:MODEL judge.")
@cache_option
@click.option("--out", "-o", default=None, help="Write here instead of in place.")
@gather(judging=JudgeSettings)
def judge(csv_file, trait, judging, backend, out):
    """Score a generation CSV for the trait and for coherence with an LLM judge."""
    from pertoken.pipeline.judge.judges import make_judge
    from pertoken.pipeline.judge.stage import judge_csv
    from pertoken.traits import load_trait

    kit = load_trait(trait)
    judge = make_judge(kit, judging, model=ModelChoice("", backend))
    r = judge_csv(csv_file, judge, out=out)
    click.echo(
        f"{r.path}: {r.rows} rows judged by {r.judge_model} "
        f"({r.requests} calls, {r.cached} cached, {r.seconds:.1f}s)"
    )
    for m in (kit.name, "coherence"):
        if r.refused[m] or r.failed[m]:
            click.echo(
                f"  {m}: {r.refused[m] + r.failed[m]} scores missing "
                f"({r.refused[m]} refused, {r.failed[m]} failed; rerun to retry failures)"
            )


@click.command()
@model_options()
@click.option("--pos", "pos_csv", required=True, type=click.Path(dir_okay=False))
@click.option("--neg", "neg_csv", required=True, type=click.Path(dir_okay=False))
@trait_option
@click.option("--threshold", default=50.0, show_default=True, help="Trait score cut T.")
@click.option("--save-dir", required=True, type=click.Path(file_okay=False))
@click.option("--batch-size", default=8, show_default=True)
@click.option("--min-pairs", default=1, show_default=True, help="Fewest kept pairs accepted.")
@method_option
@gather(choice=ModelChoice)
def extract(choice, pos_csv, neg_csv, trait, threshold, save_dir, batch_size, min_pairs, method):
    """Average the residual stream of judged pairs into persona vectors."""
    from pertoken.pipeline.extract import extract_vectors, pair_rows, vector_paths

    name = _trait_name(trait)
    vector_paths(save_dir, name)  # a trait name that would leave --save-dir stops here
    pair_rows(pos_csv, neg_csv, trait=name, threshold=threshold, min_pairs=min_pairs)
    paths = extract_vectors(
        options.load_model(choice), pos_csv=pos_csv, neg_csv=neg_csv, trait=name, save_dir=save_dir,
        extraction=Extraction(threshold, method, batch_size, min_pairs),
    )  # fmt: skip
    for p in paths.values():
        click.echo(str(p))


def _memory_batch(choice: ModelChoice, max_new_tokens: int):
    """On MLX: fail now if the model will not fit, else the batch its memory holds."""
    from pertoken.backends import check_memory

    c = choice
    fit = check_memory(c.model, c.backend, dtype=c.dtype, max_new_tokens=max_new_tokens)
    if fit is None:
        return None
    click.echo(f"memory: {fit.summary()}")
    return fit.batch_size


def _trait_name(trait: str) -> str:
    """A trait name for CSV columns: the kit's name when `trait` names a kit, else itself."""
    from pertoken.traits import load_trait

    try:
        return load_trait(trait).name
    except PertokenError:
        return trait


@click.command()
@model_options(default_model="auto")
@trait_option
@click.option("--out", "-o", default="runs", show_default=True, help="Root of the run folders.")
@click.option("--n-per-question", default=10, show_default=True, help="Samples per question.")
@click.option("--max-new-tokens", default=1000, show_default=True, help="Most tokens per answer.")
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@sampler_option
@click.option("--seed", default=0, show_default=True, help="Sampling seed.")
@click.option("--batch-size", type=int, default=None, help=BATCH_HELP)
@judge_options
@click.option("--cache", default=None, help="Score cache (default ~/.cache/pertoken/judge.sqlite).")
@click.option(
    "--threshold", default=50.0, show_default=True, help="Trait score cut T for keeping a pair."
)
@method_option
@compile_option
@gather(choice=ModelChoice, generation=Generation, judging=JudgeSettings, extraction=Extraction)
def run(choice, trait, out, generation, judging, extraction):
    """Generate, judge, extract and vet in one resumable run (model auto: Gemma 2 9B-it)."""
    import time

    from pertoken.backends import check_memory, choose, default_model
    from pertoken.pipeline.run import Watch, run_pipeline

    start, backend = time.perf_counter(), choice.backend
    given = choice.model != "auto"
    choice = choice if given else replace(choice, model=default_model(backend))
    chosen = choose(backend)
    reason = f"--backend auto: {chosen.reason}" if backend == "auto" else chosen.reason
    why = {"backend": reason} | ({} if given else {"model": f"the {chosen.backend} default"})
    # a model too big for MLX's memory fails here, in seconds, before anything is imported
    fit = check_memory(
        choice.model, backend, dtype=choice.dtype, max_new_tokens=generation.max_tokens
    )
    click.echo(_run_banner(choice, trait, out, generation, judging, why))
    if fit is not None:
        click.echo(f"memory: {fit.summary()}")
        generation = replace(generation, batch_size=generation.batch_size or fit.batch_size)

    def stage_done(stage: str, status: str, seconds: float) -> None:
        click.echo(f"{stage:12s} {seconds:7.1f}s  {status}")

    r = run_pipeline(
        choice, trait, out=out, generation=generation, judging=judging, extraction=extraction,
        watch=Watch(on_stage=stage_done),
    )  # fmt: skip
    click.echo(f"pairs kept: {r.pairs_kept} of {r.pairs_total}")
    if r.backend is not None:
        options.report_compile(r.backend)
    for p in r.vectors.values():
        click.echo(str(p))
    _echo_report(r.report)
    click.echo(f"done in {time.perf_counter() - start:.1f}s")


def _echo_report(path) -> None:
    """The report card's suggestion and warnings, then where it is."""
    from pertoken.pipeline.vet.card import load_report
    from pertoken.pipeline.vet.write import summary_lines

    if path is None:
        return
    for line in summary_lines(load_report(path)):
        click.echo(line)
    click.echo(f"report: {path.with_suffix('.md')}")


def _run_banner(choice, trait, out, generation, judging, why: dict) -> str:
    """What `run` will use and where it writes, before any work starts."""
    from pertoken.backends import choose_settings
    from pertoken.pipeline.banner import banner
    from pertoken.pipeline.generate import plan_rows
    from pertoken.pipeline.run import run_folder
    from pertoken.traits import load_trait

    c = choice
    name, device, dtype = choose_settings(c.model, c.backend, dtype=c.dtype, device=c.device)
    kit, n = load_trait(trait), generation.samples
    rows = len(plan_rows(kit, n_per_question=n))
    plan = (
        f"{rows} rows a side ({len(kit.questions)} questions x {len(kit.instructions)} "
        f"instruction pairs x {n} samples), up to {generation.max_tokens} new tokens each, "
        "each judged for the trait and coherence; a time estimate follows the first answers"
    )
    chosen = replace(choice, backend=name, device=device, dtype=dtype)
    folder = run_folder(out, choice.model, kit.name)
    return banner(chosen, judging, folder, why=why, plan=plan)


COMMANDS = [traits, generate, judge, extract, run]
