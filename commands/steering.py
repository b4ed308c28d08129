"""Commands that steer and read a model: steer, eval, monitor, project."""

from __future__ import annotations

import click

from pertoken.commands import options
from pertoken.commands.options import (
    cache_option,
    gather,
    generation_options,
    judge_options,
    model_options,
    positions_option,
    sampler_option,
    trait_option,
)
from pertoken.errors import PertokenError
from pertoken.pipeline.options import Generation, JudgeSettings, ModelChoice


@click.command()
@model_options()
@click.option("--vector", "vectors", multiple=True, help="Vector .pt to add (repeatable).")
@click.option("--layer", "layers", multiple=True, type=int, help="Row to steer at.")
@click.option("--coef", "coefs", multiple=True, type=float, help="Coefficient.")
@options.operator_options
@positions_option
@generation_options(200, sampler=True)
@click.argument("prompt")
@gather(choice=ModelChoice, generation=Generation)
def steer(choice, generation, vectors, layers, coefs, ablates, caps, positions, prompt, system):
    """Print a steered answer beside the unsteered one (same seed).

    Several --vector/--layer/--coef triples are paired in order and added together; --ablate
    and --cap terms follow them."""
    from pertoken.pipeline.steer import (
        build_steer,
        parse_specs,
        side_by_side,
        steer_compare,
        zip_specs,
    )

    adds = zip_specs(list(vectors), list(layers), list(coefs)) if vectors or layers or coefs else []
    specs = adds + parse_specs((), ablates, caps)
    if not specs:
        raise PertokenError(
            "nothing to steer with: give --vector/--layer/--coef, --ablate or --cap"
        )
    bk = options.load_model(choice)
    st = build_steer(bk, specs, positions=positions)
    res = steer_compare(bk, prompt, st, generation, system=system)
    click.echo("steering: " + "; ".join(s.describe() for s in specs) + f" (positions {positions})")
    click.echo(side_by_side(res.unsteered, res.steered))


@click.command(name="eval")
@model_options()
@trait_option
@click.option("--vector", "-v", "vector_path", required=True, type=click.Path(dir_okay=False))
@click.option("--layers", required=True, help="Rows to steer at, e.g. 12,16,20.")
@click.option(
    "--coefs",
    default="-2,-1,0,1,2",
    show_default=True,
    help="Coefficients, or auto: search each row's best coefficient that keeps coherence.",
)
@click.option(
    "--cap",
    "cap_sweep",
    is_flag=True,
    help="Sweep cap thresholds instead: each --coefs value caps the projection from above "
    "(in the units the monitor prints).",
)
@click.option(
    "--min-coherence",
    default=70.0,
    show_default=True,
    help="With --coefs auto: the coherence a setting must keep.",
)
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder.")
@judge_options
@cache_option
@click.option("--n-per-question", default=10, show_default=True, help="Samples per question.")
@click.option("--max-new-tokens", default=1000, show_default=True)
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@sampler_option
@positions_option
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True)
@options.compile_option
@options.ray_options
def eval_(
    model,
    backend,
    dtype,
    device,
    trait,
    vector_path,
    layers,
    coefs,
    out,
    judge_model,
    base_url,
    concurrency,
    coherence_prompt,
    max_consecutive_failures,
    cache,
    n_per_question,
    max_new_tokens,
    temperature,
    sampler,
    positions,
    batch_size,
    seed,
    min_coherence,
    compile_,
    ray_address,
    workers,
    cap_sweep,
):
    """Sweep layers x coefficients on a trait's evaluation questions and judge the effect.

    --coefs auto searches instead: per layer, the largest trait score whose coherence stays
    at or above --min-coherence, and the best (layer, coefficient)."""
    from pertoken.pipeline.judge.judges import make_judge
    from pertoken.pipeline.judge.rubrics import read_rubric
    from pertoken.pipeline.options import Generation
    from pertoken.pipeline.sweep.grid import evaluate, format_table, parse_coefs
    from pertoken.pipeline.sweep.store import Sweep
    from pertoken.rows import parse_layers
    from pertoken.traits import load_trait, require_eval_questions
    from pertoken.vectors import load_vector

    kit = load_trait(trait)
    auto = coefs.strip() == "auto"
    require_eval_questions(kit)
    vector = load_vector(vector_path)
    rows, coef_list = parse_layers(layers), [] if auto else parse_coefs(coefs)
    op = "cap" if cap_sweep else "add"
    sweep = Sweep(kit, vector, rows, coef_list, positions=positions, op=op, vector_path=vector_path)
    gen = Generation(samples=n_per_question, max_tokens=max_new_tokens, temperature=temperature,
                     sampler=sampler, seed=seed, batch_size=batch_size)  # fmt: skip
    rubric = read_rubric(coherence_prompt) if coherence_prompt else None
    if auto and cap_sweep:
        raise PertokenError("--coefs auto searches coefficients: give cap thresholds with --cap")
    if auto and ray_address:
        raise PertokenError("--coefs auto runs in this process: drop --ray, or give --coefs")
    sizes = (len(kit.eval_questions), n_per_question, max_new_tokens)
    plan = _eval_plan(rows, None if auto else coef_list, *sizes)
    click.echo(_eval_banner(model, backend, dtype, device, judge_model, base_url, out, plan))
    choice = ModelChoice(model, backend, dtype, device, compile_)
    with options.model_or_pool(choice, ray_address, workers) as (b, pool):
        vector.check_model(b.n_layers, b.hidden_size, vector_path)
        judging = JudgeSettings(
            judge_model, base_url, concurrency, cache, rubric, max_consecutive_failures
        )
        same = ModelChoice(model if pool is None else "", backend)  # a `local:` judge reuses it
        judge = make_judge(kit, judging, model=same, backend=lambda: b)
        judge.check(reach=False)  # a missing key is an error before any generation
        opts = dict(out_dir=out, judge=judge, generation=gen)
        if auto:
            return _search(b, sweep, opts, min_coherence)
        r = evaluate(b, sweep, pool=pool, **opts)
    click.echo(format_table(kit.name, r.summary))
    options.report_compile(b)
    missing = sum(s.missing for s in r.summary)
    if missing:
        click.echo(f"{missing} answers have no {kit.name} score (judge refusals or failures)")
    click.echo(f"{r.out_dir}: answers.csv, summary.csv, sweep.png ({r.seconds:.1f}s)")


def _eval_plan(rows, coefs, n_questions: int, n: int, max_new_tokens: int) -> str:
    """How many answers eval makes: the grid's, or the search's bound (coefs None)."""
    from pertoken.pipeline.sweep.search import search_plan

    tokens = f"up to {max_new_tokens} new tokens each, each judged for the trait and coherence"
    if coefs is None:
        _, most = search_plan(n_questions, len(rows), n)
        return f"coefficient search over layers {rows}: {most}; {tokens}"
    settings = len(rows) * len([c for c in coefs if c != 0]) + 1
    return (
        f"{settings} settings (layers x coefficients, and unsteered) x {n_questions} questions "
        f"x {n} samples = {settings * n_questions * n} answers, {tokens}"
    )


def _eval_banner(model, backend, dtype, device, judge_model, base_url, out, plan) -> str:
    from pertoken.backends import choose_settings
    from pertoken.pipeline.banner import banner

    name, device, dtype = choose_settings(model, backend, dtype=dtype, device=device)
    chosen, judging = ModelChoice(model, name, dtype, device), JudgeSettings(judge_model, base_url)
    return banner(chosen, judging, out, plan=plan)


def _search(backend, sweep, opts: dict, min_coherence: float) -> None:
    from pertoken.pipeline.sweep.search import format_search, search_coefs

    r = search_coefs(backend, sweep, min_coherence=min_coherence, **opts)
    click.echo(format_search(sweep.trait.name, r))
    click.echo(f"{r.out_dir}: answers.csv, summary.csv, search.json, sweep.png ({r.seconds:.1f}s)")


@click.command()
@model_options()
@options.vectors_option()
@click.option("--layers", required=True, help="Rows to project at, e.g. 16,20.")
@click.option("--steer", "steers", multiple=True, help="Steer while generating: V.pt:LAYER:COEF.")
@options.operator_options
@positions_option
@click.option(
    "--compare-unsteered", is_flag=True, help="With --steer, also trace the unsteered answer."
)
@click.option("--prompts", "prompts_file", default=None, help="File: one prompt a line, or JSON.")
@click.option(
    "--out", default=".", show_default=True, help="Folder for the trace store and its page."
)
@click.option("--sae", default=None, help="SAE spec: add each token's top SAE features.")
@click.option("--sae-layer", type=int, default=None, help="Row the SAE reads (default: its own).")
@click.option("--sae-top", type=int, default=5, show_default=True, help="Features per token.")
@generation_options(200)
@click.argument("prompt", required=False)
@gather(choice=ModelChoice, generation=Generation)
def monitor(
    choice,
    generation,
    vectors,
    layers,
    steers,
    ablates,
    caps,
    positions,
    compare_unsteered,
    prompts_file,
    out,
    sae,
    sae_layer,
    sae_top,
    prompt,
    system,
):
    """Project every generated token onto persona vectors, live and as an HTML page."""
    from pertoken.pipeline.monitor import Monitoring
    from pertoken.pipeline.monitor import monitor as run_monitor
    from pertoken.pipeline.steer import build_steer, parse_specs
    from pertoken.pipeline.trace.inputs import read_prompts
    from pertoken.rows import parse_layers
    from pertoken.vectors import load_vector

    prompts = ([prompt] if prompt else []) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise PertokenError("no prompt: give a prompt argument or --prompts FILE")
    if compare_unsteered and not (steers or ablates or caps):
        raise PertokenError("--compare-unsteered needs --steer, --ablate or --cap")
    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    specs = parse_specs(steers, ablates, caps)
    bk = options.load_model(choice)
    for name, vec in loaded.items():
        vec.check_model(bk.n_layers, bk.hidden_size, files[name])
    st = build_steer(bk, specs, positions=positions) if specs else None
    extra = {"vector_files": files, "steer_files": [s.describe() for s in specs] or None}
    rows = parse_layers(layers)
    on_trace = None
    if sae:
        from pertoken.pipeline.decompose import sae_feature_hook

        on_trace = sae_feature_hook(
            sae, rows=rows, hidden_size=bk.hidden_size, layer=sae_layer, top=sae_top
        )
        extra |= {"sae": sae}
    how = Monitoring(system, st, compare_unsteered, out, live=True, settings=extra,
                     on_trace=on_trace)  # fmt: skip
    records = run_monitor(bk, prompts, loaded, rows, generation, how)
    click.echo(
        f"wrote {len(records)} answer(s) as a trace store in {out} (open {out}/trace.html; "
        "pertoken.trace.load reads it)"
    )


def _named_vectors(items) -> dict[str, str]:
    """('name=path' | 'path', ...) -> {name: path}; names must be distinct."""
    from pathlib import Path

    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).stem, item
        if not name or not path:
            raise PertokenError(f"could not read --vector {item!r}: write NAME=FILE.pt")
        if name in out:
            raise PertokenError(f"two vectors are named {name!r}: give them names, NAME=FILE.pt")
        out[name] = path
    return out


@click.command()
@model_options()
@click.argument("csv_file")
@click.option("--vector", required=True, help="Persona vector .pt file.")
@click.option("--layer", required=True, type=int, help="Row to project at.")
@click.option("--out", default=None, help="Output CSV (default: add the columns in place).")
@click.option("--batch-size", default=8, show_default=True, type=int)
@gather(choice=ModelChoice)
def project(choice, csv_file, vector, layer, out, batch_size):
    """Add projection columns to a generation CSV and print r against the trait score."""
    from pertoken.pipeline.project import describe_correlations, project_csv

    bk = options.load_model(choice)
    res = project_csv(
        bk, csv_file, vector_path=vector, layer=layer, out_path=out, batch_size=batch_size
    )
    click.echo(f"wrote {res.n_rows} rows with {', '.join(res.columns)} to {res.out_path}")
    for line in describe_correlations(res):
        click.echo(line)


COMMANDS = [steer, eval_, monitor, project]
