"""`pertoken sweep PLAN.toml`: every (model, trait) job of a plan, here or on Ray."""

from __future__ import annotations

import click

from pertoken.errors import PertokenError


@click.command()
@click.argument("plan_file", metavar="PLAN.toml", type=click.Path(dir_okay=False))
@click.option(
    "--ray", "ray_address", default=None, metavar="local|auto|ADDRESS",
    help="One Ray task per job: local starts Ray here, auto joins RAY_ADDRESS "
    "(default: the jobs one after another in this process).",
)  # fmt: skip
def sweep(plan_file, ray_address):
    """Run every (model, trait) job of a plan as `pertoken run` does, with its optional eval
    grid and traces; resumable; writes OUT/sweep.csv and prints one line per job."""
    from pertoken.pipeline.sweep.jobs import format_table, run_sweep
    from pertoken.pipeline.sweep.plan import read_plan

    plan = read_plan(plan_file)
    where = "one after another" if ray_address is None else f"on Ray ({ray_address})"
    m, t = len(plan.models), len(plan.traits)
    click.echo(f"sweep: {_n(m * t, 'job')} ({_n(m, 'model')} x {_n(t, 'trait')}) {where}, "
               f"into {plan.out}")  # fmt: skip
    results = run_sweep(plan, ray_address=ray_address, echo=click.echo)
    click.echo(format_table(results))
    failed = sum(r.state != "done" for r in results)
    summary = f"{plan.out / 'sweep.csv'}: {len(results) - failed} done, {failed} failed"
    if failed:  # a nonzero exit for scripts; everything finished is saved
        raise PertokenError(f"{summary}: fix them and rerun, finished stages are kept")
    click.echo(summary)


def _n(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


COMMANDS = [sweep]
