"""The `pertoken` command line. Each command parses options, calls one pipeline function and
reports; heavy modules are imported inside the commands so `pertoken --help` stays instant."""

from __future__ import annotations

import functools
import sys

import click

from pertoken import __version__
from pertoken.errors import PertokenError


class _Group(click.Group):
    """Turns PertokenError into one line on stderr and Ctrl-C into a resumable stop."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PertokenError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted: finished work is saved; rerun the same command to resume", err=True
            )
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pertoken")
def main():
    """Persona vectors for chat LLMs: extract, steer, evaluate and monitor traits per token,
    natively on Apple Silicon (MLX) and CUDA (PyTorch)."""


def model_options(default_model: str | None = None):
    """--model, --backend, --dtype, --device, shared by every command that loads a model."""

    def wrap(f):
        @click.option(
            "--model",
            "-m",
            default=default_model,
            required=default_model is None,
            help="Hugging Face hub id or local folder.",
        )
        @click.option(
            "--backend",
            type=click.Choice(["auto", "torch", "mlx"]),
            default="auto",
            show_default=True,
            help="auto = mlx on Apple Silicon when installed.",
        )
        @click.option("--dtype", default=None, help="float32, bfloat16 or float16 (auto).")
        @click.option(
            "--device", default=None, help="torch: cuda, cpu or mps; mlx: gpu or cpu (auto)."
        )
        @functools.wraps(f)
        def inner(*args, **kwargs):
            return f(*args, **kwargs)

        return inner

    return wrap


def load_model(model: str, backend: str, dtype: str | None, device: str | None):
    from pertoken.backends import load_backend

    return load_backend(model, backend, dtype=dtype, device=device)


def _later(name: str):
    raise PertokenError(f"`pertoken {name}` is not available in this version")


# ---------------------------------------------------------------- traits and extraction
@main.group()
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


def _trait_option(f):
    return click.option(
        "--trait", "-t", required=True, help="Bundled kit name, kit JSON, or upstream file."
    )(f)


def _judge_options(f):
    from pertoken.pipeline.judge import DEFAULT_JUDGE

    f = click.option("--concurrency", default=32, show_default=True, help="Requests in flight.")(f)
    f = click.option("--base-url", default=None, help="Any OpenAI-compatible server.")(f)
    return click.option(
        "--judge-model",
        "--judge",
        "judge_model",
        default=DEFAULT_JUDGE,
        show_default=True,
        help="Judge model, or local:MODEL to judge in-process with a pertoken backend.",
    )(f)


@main.command()
@model_options()
@_trait_option
@click.option("--polarity", type=click.Choice(["pos", "neg"]), default="pos", show_default=True)
@click.option("--eval", "eval_", is_flag=True, help="Eval questions, no system instruction.")
@click.option("--n-per-question", default=10, show_default=True, help="Samples per prompt.")
@click.option("--max-new-tokens", default=1000, show_default=True)
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@click.option("--batch-size", type=int, default=None, help="Rows per batch (32 on CUDA, else 16).")
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="CSV to write.")
def generate(
    model,
    backend,
    dtype,
    device,
    trait,
    polarity,
    eval_,
    n_per_question,
    max_new_tokens,
    temperature,
    batch_size,
    seed,
    out,
):
    """Answer a trait's questions under its positive or negative instructions."""
    from pertoken.pipeline.generate import generate_csv, is_complete, plan_rows
    from pertoken.traits import load_trait

    kit = load_trait(trait)
    specs = plan_rows(kit, polarity=polarity, eval=eval_, n_per_question=n_per_question)
    if is_complete(out, specs):  # nothing to do: do not load the model
        return click.echo(f"{out}: all {len(specs)} rows are already there")
    r = generate_csv(
        load_model(model, backend, dtype, device),
        trait=kit,
        out=out,
        polarity=polarity,
        eval=eval_,
        n_per_question=n_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
    )
    click.echo(f"{r.path}: {r.rows} rows ({r.generated} generated now, {r.seconds:.1f}s)")


@main.command()
@click.argument("csv_file", type=click.Path(dir_okay=False))
@_trait_option
@_judge_options
@click.option(
    "--backend",
    type=click.Choice(["auto", "torch", "mlx"]),
    default="auto",
    help="Backend of a local:MODEL judge.",
)
@click.option("--cache", default=None, help="Score cache (default ~/.cache/pertoken/judge.sqlite).")
@click.option("--out", "-o", default=None, help="Write here instead of in place.")
def judge(csv_file, trait, judge_model, base_url, concurrency, backend, cache, out):
    """Score a generation CSV for the trait and for coherence with an LLM judge."""
    from pertoken.pipeline.judge import judge_csv, make_judge
    from pertoken.traits import load_trait

    kit = load_trait(trait)

    def make():
        return make_judge(
            judge_model, base_url=base_url, concurrency=concurrency, backend_name=backend
        )

    r = judge_csv(csv_file, trait=kit, judge_model=judge_model, judge=make, cache=cache, out=out)
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


@main.command()
@model_options()
@click.option("--pos", "pos_csv", required=True, type=click.Path(dir_okay=False))
@click.option("--neg", "neg_csv", required=True, type=click.Path(dir_okay=False))
@_trait_option
@click.option("--threshold", default=50.0, show_default=True, help="Trait score cut T.")
@click.option("--save-dir", required=True, type=click.Path(file_okay=False))
@click.option("--batch-size", default=8, show_default=True)
@click.option("--min-pairs", default=1, show_default=True, help="Fewest kept pairs accepted.")
def extract(
    model,
    backend,
    dtype,
    device,
    pos_csv,
    neg_csv,
    trait,
    threshold,
    save_dir,
    batch_size,
    min_pairs,
):
    """Average the residual stream of judged pairs into persona vectors."""
    from pertoken.pipeline.extract import extract_vectors, pair_rows

    name = _trait_name(trait)
    pair_rows(pos_csv, neg_csv, trait=name, threshold=threshold, min_pairs=min_pairs)
    paths = extract_vectors(
        load_model(model, backend, dtype, device),
        pos_csv=pos_csv,
        neg_csv=neg_csv,
        trait=name,
        threshold=threshold,
        save_dir=save_dir,
        batch_size=batch_size,
        min_pairs=min_pairs,
    )
    for p in paths.values():
        click.echo(str(p))


def _trait_name(trait: str) -> str:
    """A trait name for CSV columns: the kit's name when `trait` names a kit, else itself."""
    from pertoken.traits import load_trait

    try:
        return load_trait(trait).name
    except PertokenError:
        return trait


@main.command()
@model_options(default_model="auto")
@_trait_option
@click.option("--out", "-o", default="runs", show_default=True, help="Root of the run folders.")
@click.option("--n-per-question", default=10, show_default=True)
@click.option("--max-new-tokens", default=1000, show_default=True)
@click.option("--batch-size", type=int, default=None, help="Rows per batch (32 on CUDA, else 16).")
@_judge_options
@click.option("--threshold", default=50.0, show_default=True)
def run(
    model,
    backend,
    dtype,
    device,
    trait,
    out,
    n_per_question,
    max_new_tokens,
    batch_size,
    judge_model,
    base_url,
    concurrency,
    threshold,
):
    """Generate, judge and extract in one resumable run (model auto: gemma-2-9b-it)."""
    from pertoken.pipeline.run import default_model, run_pipeline

    if model == "auto":
        model = default_model(backend)
    r = run_pipeline(
        model=model,
        trait=trait,
        backend=backend,
        out=out,
        n_per_question=n_per_question,
        max_new_tokens=max_new_tokens,
        judge_model=judge_model,
        base_url=base_url,
        threshold=threshold,
        concurrency=concurrency,
        batch_size=batch_size,
        dtype=dtype,
        device=device,
    )
    for stage, (status, seconds) in r.stages.items():
        click.echo(f"{stage:12s} {seconds:7.1f}s  {status}")
    click.echo(f"pairs kept: {r.pairs_kept} of {r.pairs_total}")
    for p in r.vectors.values():
        click.echo(str(p))


# ---------------------------------------------------------------- steering and monitoring
def _positions_option(f):
    return click.option(
        "--positions",
        type=click.Choice(["all", "prompt", "response"]),
        default="all",
        show_default=True,
        help="Where to add the vectors: every token, the prompt only, or the answer only.",
    )(f)


def _generation_options(default_tokens: int):
    def wrap(f):
        f = click.option("--system", default=None, help="System prompt.")(f)
        f = click.option("--max-new-tokens", default=default_tokens, show_default=True, type=int)(f)
        f = click.option("--seed", default=0, show_default=True, type=int)(f)
        f = click.option(
            "--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."
        )(f)
        return f

    return wrap


@main.command()
@model_options()
@click.option("--vector", "vectors", multiple=True, required=True, help="Vector .pt (repeatable).")
@click.option("--layer", "layers", multiple=True, required=True, type=int, help="Row to steer at.")
@click.option("--coef", "coefs", multiple=True, required=True, type=float, help="Coefficient.")
@_positions_option
@_generation_options(200)
@click.argument("prompt")
def steer(model, backend, dtype, device, vectors, layers, coefs, positions, prompt, **gen):
    """Print a steered answer beside the unsteered one (same seed).

    Several --vector/--layer/--coef triples are paired in order and added together."""
    from pertoken.pipeline.steer import build_steer, side_by_side, steer_compare, zip_specs

    specs = zip_specs(list(vectors), list(layers), list(coefs))
    bk = load_model(model, backend, dtype, device)
    st = build_steer(bk, specs, positions=positions)
    res = steer_compare(bk, prompt, steer=st, **gen)
    click.echo("steering: " + "; ".join(s.describe() for s in specs) + f" (positions {positions})")
    click.echo(side_by_side(res.unsteered, res.steered))


@main.command(name="eval")
@model_options()
@_trait_option
@click.option("--vector", "-v", "vector_path", required=True, type=click.Path(dir_okay=False))
@click.option("--layers", required=True, help="Rows to steer at, e.g. 12,16,20.")
@click.option("--coefs", default="-2,-1,0,1,2", show_default=True, help="Coefficients.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder.")
@_judge_options
@click.option("--cache", default=None, help="Score cache (default ~/.cache/pertoken/judge.sqlite).")
@click.option("--n-per-question", default=10, show_default=True, help="Samples per question.")
@click.option("--max-new-tokens", default=1000, show_default=True)
@click.option("--temperature", type=float, default=None, help="Default 1.0 (0 when n is 1).")
@click.option(
    "--positions",
    type=click.Choice(["all", "prompt", "response"]),
    default="response",
    show_default=True,
    help="Positions the vector is added at.",
)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seed", default=0, show_default=True)
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
    cache,
    n_per_question,
    max_new_tokens,
    temperature,
    positions,
    batch_size,
    seed,
):
    """Sweep layers x coefficients on a trait's evaluation questions and judge the effect."""
    from pertoken.pipeline.evaluate import csv_judge, evaluate, format_table, parse_coefs
    from pertoken.rows import parse_layers
    from pertoken.traits import load_trait
    from pertoken.vectors import load_vector

    kit, vector = load_trait(trait), load_vector(vector_path)
    rows, coef_list = parse_layers(layers), parse_coefs(coefs)
    b = load_model(model, backend, dtype, device)
    vector.check_model(b.n_layers, b.hidden_size, vector_path)
    judge = _lazy_judge(judge_model, base_url, concurrency, backend, b, model)
    r = evaluate(
        b,
        trait=kit,
        vector=vector,
        layers=rows,
        coefs=coef_list,
        out_dir=out,
        judge=csv_judge(kit, judge_model=judge_model, judge=judge, cache=cache),
        n_per_question=n_per_question,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        positions=positions,
        batch_size=batch_size,
        seed=seed,
        vector_path=vector_path,
    )
    click.echo(format_table(kit.name, r.summary))
    missing = sum(s.missing for s in r.summary)
    if missing:
        click.echo(f"{missing} answers have no {kit.name} score (judge refusals or failures)")
    click.echo(f"{r.out_dir}: answers.csv, summary.csv, sweep.png ({r.seconds:.1f}s)")


def _lazy_judge(judge_model, base_url, concurrency, backend_name, loaded, model):
    """A judge made on first need (a local judge's model loads only then; `local:M` with the
    steered model M reuses it); an API judge's missing key is an error before any generation."""
    import functools

    from pertoken.pipeline.judge import make_judge

    if not judge_model.startswith("local:"):
        from pertoken.pipeline.judge_openai import api_key

        api_key(base_url)
    same = loaded if judge_model == f"local:{model}" else None
    return functools.cache(
        lambda: make_judge(
            judge_model,
            base_url=base_url,
            concurrency=concurrency,
            backend=same,
            backend_name=backend_name,
        )
    )


@main.command()
@model_options()
@click.option(
    "--vector",
    "vectors",
    multiple=True,
    required=True,
    help="NAME=FILE.pt (repeatable; NAME defaults to the file name).",
)
@click.option("--layers", required=True, help="Rows to project at, e.g. 16,20.")
@click.option("--steer", "steers", multiple=True, help="Steer while generating: V.pt:LAYER:COEF.")
@_positions_option
@click.option(
    "--compare-unsteered", is_flag=True, help="With --steer, also trace the unsteered answer."
)
@click.option("--prompts", "prompts_file", default=None, help="File: one prompt a line, or JSON.")
@click.option("--out", default=".", show_default=True, help="Folder for trace.json/trace.html.")
@click.option("--sae", default=None, help="SAE spec: add each token's top SAE features.")
@click.option("--sae-layer", type=int, default=None, help="Row the SAE reads (default: its own).")
@click.option("--sae-top", type=int, default=5, show_default=True, help="Features per token.")
@_generation_options(200)
@click.argument("prompt", required=False)
def monitor(
    model,
    backend,
    dtype,
    device,
    vectors,
    layers,
    steers,
    positions,
    compare_unsteered,
    prompts_file,
    out,
    sae,
    sae_layer,
    sae_top,
    prompt,
    **gen,
):
    """Project every generated token onto persona vectors, live and as an HTML page."""
    from pertoken.pipeline.monitor import monitor as run_monitor
    from pertoken.pipeline.monitor import read_prompts
    from pertoken.pipeline.steer import build_steer, parse_steer_spec
    from pertoken.rows import parse_layers
    from pertoken.vectors import load_vector

    prompts = ([prompt] if prompt else []) + (read_prompts(prompts_file) if prompts_file else [])
    if not prompts:
        raise PertokenError("no prompt: give a prompt argument or --prompts FILE")
    if compare_unsteered and not steers:
        raise PertokenError("--compare-unsteered needs --steer V.pt:LAYER:COEF")
    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    specs = [parse_steer_spec(s) for s in steers]
    bk = load_model(model, backend, dtype, device)
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
    records = run_monitor(
        bk,
        prompts=prompts,
        vectors=loaded,
        layers=rows,
        steer=st,
        out_dir=out,
        compare_unsteered=compare_unsteered,
        settings=extra,
        on_trace=on_trace,
        **gen,
    )
    click.echo(f"wrote {len(records)} trace(s) to {out}/trace.json and {out}/trace.html")


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


@main.command()
@model_options()
@click.argument("csv_file")
@click.option("--vector", required=True, help="Persona vector .pt file.")
@click.option("--layer", required=True, type=int, help="Row to project at.")
@click.option("--out", default=None, help="Output CSV (default: add the columns in place).")
@click.option("--batch-size", default=8, show_default=True, type=int)
def project(model, backend, dtype, device, csv_file, vector, layer, out, batch_size):
    """Add projection columns to a generation CSV and print r against the trait score."""
    from pertoken.pipeline.project import project_csv

    bk = load_model(model, backend, dtype, device)
    res = project_csv(
        bk, csv_file, vector_path=vector, layer=layer, out_path=out, batch_size=batch_size
    )
    click.echo(f"wrote {res.n_rows} rows with {', '.join(res.columns)} to {res.out_path}")
    if res.trait and res.r is not None:
        click.echo(
            f"Pearson r({res.columns[0]}, {res.trait}) = {res.r:+.4f} over {res.n_scored} rows"
        )
    elif res.trait:
        click.echo(f"Pearson r is undefined: {res.n_scored} rows with a {res.trait} score")


# ---------------------------------------------------------------- decompose and export
@main.command()
@click.option(
    "--vector", "-v", "vector", required=True, type=click.Path(), help="Persona vector .pt."
)
@click.option(
    "--layer", "-l", required=True, type=int, help="Vector row (Gemma Scope layer_{L-1})."
)
@click.option("--sae", "sae", required=True, help="params.npz, SAE folder, or hub 'REPO PATH'.")
@click.option("--top", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "json_out", type=click.Path(), default=None, help="Also write JSON here.")
def decompose(vector, layer, sae, top, json_out):
    """Explain a vector row in sparse-autoencoder features."""
    from pertoken.pipeline.decompose import decompose as run_decompose
    from pertoken.pipeline.decompose import format_table

    result = run_decompose(vector, layer=layer, sae=sae, top=top)
    for w in result.warnings:
        click.secho(f"warning: {w}", fg="yellow", err=True)
    click.echo(format_table(result))
    if json_out:
        click.echo(f"wrote {result.save_json(json_out)}")


@main.command()
@click.argument("vector", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["pt", "safetensors", "gguf"]),
    default=None,
    help="Default: from the --out suffix.",
)
@click.option("--out", "-o", required=True, type=click.Path(), help="File to write.")
@click.option("--layers", default=None, help="Rows to write, e.g. 12,16,20 (default: all).")
@click.option("--model-hint", default=None, help="GGUF controlvector.model_hint (e.g. llama).")
def export(vector, fmt, out, layers, model_hint):
    """Write a vector as .pt, .safetensors or a llama.cpp GGUF control vector."""
    from pertoken.pipeline.export import export_vector
    from pertoken.rows import parse_layers

    rows = parse_layers(layers) if layers else None
    res = export_vector(vector, out=out, fmt=fmt, layers=rows, model_hint=model_hint)
    if res.left_out:
        click.echo(
            f"rows {res.left_out[0]}-{res.left_out[-1]} left out: a GGUF control vector "
            "cannot hold them (llama.cpp rejects direction.0)"
        )
    click.echo(f"wrote {res.path} ({res.format}, rows {_span(res.rows)})")


@main.command(name="import")
@click.argument("path", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(), help="Persona vector .pt to write.")
@click.option(
    "--n-layers",
    type=click.IntRange(min=1),
    default=None,
    help="The model's decoder blocks (default: from controlvector.layer_count).",
)
def import_(path, out, n_layers):
    """Read a GGUF control vector back into a pertoken vector."""
    from pertoken.pipeline.export import import_vector

    vec = import_vector(path, out=out, n_layers=n_layers)
    filled = [r for r in range(vec.n_layers + 1) if vec.data[r].any()]
    click.echo(
        f"wrote {out}: [{vec.n_layers + 1}, {vec.hidden_size}], rows {_span(filled)} filled, "
        "others zero"
    )


def _span(rows: list[int]) -> str:
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ",".join(map(str, rows)) or "none"
