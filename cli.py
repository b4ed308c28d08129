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


def trait_option(f):
    return click.option(
        "--trait", "-t", required=True, help="Bundled kit name, kit JSON, or upstream file."
    )(f)


def judge_options(f):
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


def positions_option(f):
    return click.option(
        "--positions",
        type=click.Choice(["all", "prompt", "response"]),
        default="all",
        show_default=True,
        help="Where to add the vectors: every token, the prompt only, or the answer only.",
    )(f)


def generation_options(default_tokens: int):
    def wrap(f):
        f = click.option("--system", default=None, help="System prompt.")(f)
        f = click.option("--max-new-tokens", default=default_tokens, show_default=True, type=int)(f)
        f = click.option("--seed", default=0, show_default=True, type=int)(f)
        f = click.option(
            "--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."
        )(f)
        return f

    return wrap


# The commands register themselves on `main` when their modules are imported.
from pertoken.commands import extraction, files, serve, steering  # noqa: E402, F401
