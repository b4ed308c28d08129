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
        @click.option("--device", default=None, help="cuda, cpu or mps (torch backend; auto).")
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


@main.command()
def generate():
    """Answer a trait's questions under its positive or negative instructions."""
    _later("generate")


@main.command()
def judge():
    """Score a generation CSV for the trait and for coherence with an LLM judge."""
    _later("judge")


@main.command()
def extract():
    """Average the residual stream of judged pairs into persona vectors."""
    _later("extract")


@main.command()
def run():
    """Generate, judge and extract in one resumable run."""
    _later("run")


# ---------------------------------------------------------------- steering and monitoring
@main.command()
def steer():
    """Print a steered answer beside the unsteered one."""
    _later("steer")


@main.command(name="eval")
@model_options()
@click.option("--trait", "-t", required=True, help="Bundled kit name, kit JSON, or upstream file.")
@click.option("--vector", "-v", "vector_path", required=True, type=click.Path(dir_okay=False))
@click.option("--layers", required=True, help="Rows to steer at, e.g. 12,16,20.")
@click.option("--coefs", default="-2,-1,0,1,2", show_default=True, help="Coefficients.")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False), help="Folder.")
@click.option(
    "--judge-model",
    "--judge",
    "judge_model",
    default="gpt-4.1-mini-2025-04-14",
    show_default=True,
    help="Judge model, or local:MODEL to judge in-process.",
)
@click.option("--base-url", default=None, help="Any OpenAI-compatible server.")
@click.option("--concurrency", default=32, show_default=True, help="Requests in flight.")
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
    from pertoken.pipeline.judge import make_judge
    from pertoken.rows import parse_layers
    from pertoken.traits import load_trait
    from pertoken.vectors import load_vector

    kit, vector = load_trait(trait), load_vector(vector_path)
    rows, coef_list = parse_layers(layers), parse_coefs(coefs)
    b = load_model(model, backend, dtype, device)
    same = judge_model == f"local:{model}"
    j = make_judge(
        judge_model,
        base_url=base_url,
        concurrency=concurrency,
        backend=b if same else None,
        backend_name=backend,
    )
    r = evaluate(
        b,
        trait=kit,
        vector=vector,
        layers=rows,
        coefs=coef_list,
        out_dir=out,
        judge=csv_judge(kit, judge_model=judge_model, judge=j, cache=cache),
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


@main.command()
def monitor():
    """Project every generated token onto persona vectors, live and as an HTML page."""
    _later("monitor")


@main.command()
def project():
    """Add projection columns to a generation CSV."""
    _later("project")


# ---------------------------------------------------------------- decompose and export
@main.command()
def decompose():
    """Explain a vector row in sparse-autoencoder features."""
    _later("decompose")


@main.command()
def export():
    """Write a vector as .pt, .safetensors or a llama.cpp GGUF control vector."""
    _later("export")


@main.command(name="import")
def import_():
    """Read a GGUF control vector back into a pertoken vector."""
    _later("import")
