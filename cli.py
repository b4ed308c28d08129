"""The `pertoken` command line. Each command parses options, calls one pipeline function and
reports; heavy modules are imported inside the commands so `pertoken --help` stays instant."""

from __future__ import annotations

import functools
import sys
import warnings

import click

from pertoken import __version__
from pertoken.errors import PertokenError, PertokenWarning


class _Group(click.Group):
    """Turns PertokenError into one line on stderr and Ctrl-C into a resumable stop."""

    def invoke(self, ctx):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
                return super().invoke(ctx)
        except PertokenError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo(
                "\ninterrupted: finished work is saved; rerun the same command to resume", err=True
            )
            sys.exit(130)


def _show_warning(show, message, category, *args, **kwargs):
    """pertoken's own warnings as one yellow line; others as Python shows them."""
    if issubclass(category, PertokenWarning):
        return click.secho(f"warning: {message}", fg="yellow", err=True)
    return show(message, category, *args, **kwargs)


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
            "--device",
            default=None,
            help="torch: auto (sharded over several GPUs), cuda, cpu or mps; mlx: gpu or cpu.",
        )
        @functools.wraps(f)
        def inner(*args, **kwargs):
            return f(*args, **kwargs)

        return inner

    return wrap


def load_model(
    model: str, backend: str, dtype: str | None, device: str | None, compile: bool = False
):
    from pertoken.backends import load_backend

    return load_backend(model, backend, dtype=dtype, device=device, compile=compile)


def compile_option(f):
    return click.option(
        "--compile",
        "compile_",
        is_flag=True,
        help="torch: decode through a static KV cache captured as a CUDA graph "
        "(warm-up once per batch shape, reported).",
    )(f)


def report_compile(backend) -> None:
    """One line on the compiled decode step's warm-up, when the backend has one."""
    compiled = getattr(backend, "compiled", None)
    if compiled is None:
        return
    if not compiled.graphs:
        return click.echo("compiled decode step: static KV cache, no CUDA graph on this device")
    click.echo(f"compiled decode step: warm-up {compiled.warmup_seconds:.1f}s "
               f"({compiled.captures} CUDA graph capture(s))")  # fmt: skip


def trait_option(f):
    return click.option(
        "--trait", "-t", required=True, help="Bundled kit name, kit JSON, or upstream file."
    )(f)


def judge_options(f):
    from pertoken.pipeline.judge import DEFAULT_JUDGE

    f = click.option(
        "--max-consecutive-failures",
        type=click.IntRange(min=1),
        default=8,
        show_default=True,
        help="Stop after this many judge timeouts or connection failures in a row.",
    )(f)
    f = click.option(
        "--coherence-prompt",
        type=click.Path(dir_okay=False),
        default=None,
        help="Coherence rubric file with {question} and {answer} (default: the kit's, or ours).",
    )(f)
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
        default="response",
        show_default=True,
        help="Where to add the vectors: the answer's tokens (as upstream's steerer), every "
        "token, or the prompt only.",
    )(f)


def sampler_option(f):
    return click.option(
        "--sampler",
        type=click.Choice(["plain", "model"]),
        default="plain",
        show_default=True,
        help="plain: --temperature only; model: the checkpoint's generation_config (top_k, "
        "top_p, repetition penalty; its temperature unless --temperature), as transformers' "
        "generate.",
    )(f)


def generation_options(default_tokens: int, sampler: bool = False):
    """--system, --max-new-tokens, --seed, --temperature (greedy by default); with `sampler`,
    also --sampler, and the temperature left to it when not given."""

    def wrap(f):
        f = click.option("--system", default=None, help="System prompt.")(f)
        f = click.option(
            "--max-new-tokens",
            default=default_tokens,
            show_default=True,
            type=int,
            help="Most tokens per answer.",
        )(f)
        f = click.option("--seed", default=0, show_default=True, type=int, help="Sampling seed.")(f)
        if sampler:
            f = sampler_option(f)
            help_ = "Default 0 (greedy); with --sampler model, the checkpoint's."
            return click.option("--temperature", default=None, type=float, help=help_)(f)
        return click.option(
            "--temperature", default=0.0, show_default=True, type=float, help="0 is greedy."
        )(f)

    return wrap


# The commands register themselves on `main` when their modules are imported.
from pertoken.commands import env, extraction, files, steering, vet  # noqa: E402, F401
