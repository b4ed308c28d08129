"""`pertoken serve`: the steering server and its lab page."""

from __future__ import annotations

import click

from pertoken.commands import options
from pertoken.commands.options import model_options


@click.command()
@model_options()
@click.option(
    "--vector",
    "vectors",
    multiple=True,
    help="NAME=FILE.pt a request may steer with and monitor (repeatable).",
)
@click.option("--layers", default=None, help="Rows projected when monitoring, e.g. 12,16.")
@click.option(
    "--traces", "traces", multiple=True, help="Trace store folder to browse (repeatable)."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Anything else needs --api-key."
)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--api-key", envvar="PERTOKEN_API_KEY", default=None, help="Bearer key clients send.")
@click.option(
    "--max-tokens", default=1024, show_default=True, help="Cap on a request's max_tokens."
)
@click.option("--max-batch", default=32, show_default=True, help="Rows decoded together at most.")
@click.option(
    "--max-body", default=1 << 20, show_default=True, help="Cap on a request body (bytes)."
)
@click.option(
    "--prefix-cache-mb",
    default=512.0,
    show_default=True,
    help="Memory for the keys and values of earlier prompts, reused by prompts that start "
    "with them (0: off).",
)
def serve(
    model, backend, dtype, device, vectors, layers, traces, host, port, api_key, max_tokens,
    max_batch, max_body, prefix_cache_mb,
):  # fmt: skip
    """Serve the model over an OpenAI-compatible API with per-request steering, and a lab page."""
    from pertoken.commands.steering import _named_vectors
    from pertoken.rows import check_capture_rows, parse_layers
    from pertoken.serve.app import ServeConfig
    from pertoken.serve.request import Limits
    from pertoken.serve.server import check_host, is_loopback, serve_forever
    from pertoken.serve.traces import TraceStores
    from pertoken.vectors import load_vector

    check_host(host, api_key)
    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    stores = TraceStores(list(traces)) if traces else None
    bk = options.load_model(model, backend, dtype, device)
    for name, vec in loaded.items():
        vec.check_model(bk.n_layers, bk.hidden_size, files[name])
    rows = parse_layers(layers) if layers else ([bk.n_layers // 2] if loaded else [])
    check_capture_rows(rows, bk.n_layers)
    config = ServeConfig(
        names=[bk.model_id] + ([model] if model != bk.model_id else []),
        vectors=loaded,
        layers=rows,
        limits=Limits(max_tokens=max_tokens, max_rows=max_batch),
        api_key=api_key,
        max_body=max_body,
        traces=stores,
        prefix_cache_mb=prefix_cache_mb,
    )
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    click.echo(f"serving {bk.model_id} ({bk.name}, {bk.dtype}) at {where}/v1; lab page at {where}/")
    if loaded:
        click.echo(f"vectors: {', '.join(loaded)}; monitored rows: {','.join(map(str, rows))}")
    if not is_loopback(host):
        click.echo(f"listening beyond this machine on {host}: clients must send the API key")
    serve_forever(bk, config, host=host, port=port)


COMMANDS = [serve]
