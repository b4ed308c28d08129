"""Commands on vector and SAE files: decompose, export, import."""

from __future__ import annotations

import click

from pertoken.names import FORMATS


@click.command()
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


@click.command()
@click.argument("vector", type=click.Path())
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
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


@click.command(name="import")
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
    from pertoken.vectors import ROWS_FROM_FILE

    vec = import_vector(path, out=out, n_layers=n_layers)
    filled = [r for r in range(vec.n_layers + 1) if vec.data[r].any()]
    click.echo(
        f"wrote {out}: [{vec.n_layers + 1}, {vec.hidden_size}], rows {_span(filled)} filled, "
        "others zero"
    )
    if vec.meta.get(ROWS_FROM_FILE):
        click.echo(
            f"n_layers {vec.n_layers} comes from the file; with a model that has more decoder "
            "blocks the vector is padded with zero rows (or pass --n-layers)"
        )


def _span(rows: list[int]) -> str:
    if rows and rows == list(range(rows[0], rows[-1] + 1)):
        return f"{rows[0]}..{rows[-1]}"
    return ",".join(map(str, rows)) or "none"


COMMANDS = [decompose, export, import_]
