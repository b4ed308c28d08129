"""The `pertoken` command line: the group, its error handling, and the commands of `commands/`
(each parses options, calls one pipeline function and reports; heavy modules are imported
inside the commands so `pertoken --help` stays instant)."""

from __future__ import annotations

import functools
import sys
import warnings

import click

from pertoken.commands import env, extraction, files, finetune, serve, steering, sweep, trace, vet
from pertoken.errors import PertokenError, PertokenWarning
from pertoken.version import __version__


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


for _module in (env, extraction, files, finetune, serve, steering, sweep, trace, vet):
    for _command in _module.COMMANDS:
        main.add_command(_command)


if __name__ == "__main__":  # python -m pertoken.cli
    main()
