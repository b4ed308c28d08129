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
def eval_():
    """Sweep layers x coefficients on a trait's evaluation questions and judge the effect."""
    _later("eval")


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
