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
