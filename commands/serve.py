"""`pertoken serve`: the steering server and its lab page."""

from __future__ import annotations

import click

from pertoken.commands import options
from pertoken.commands.options import model_options
from pertoken.pipeline.options import ModelChoice


@click.command()
@model_options()
@options.vectors_option(
    False, help="NAME=FILE.pt a request may steer with and monitor (repeatable)."
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
@click.option(
    "--prompts-per-step",
    default=8,
    show_default=True,
    help="Arriving requests prefilled before the next decode step, at most (the rest join at "
    "the steps after, so running answers keep streaming through a burst).",
)
@click.option(
    "--timeout",
    default=600.0,
    show_default=True,
    help="Seconds a request may wait for its next token (queued or decoding) before it fails.",
)
@click.option(
    "--allow-origin",
    "allow_origins",
    multiple=True,
    help="A web page's origin (https://host:port) that may use the API (repeatable).",
)
def serve(
    model, backend, dtype, device, vectors, layers, traces, host, port, api_key, max_tokens,
    max_batch, max_body, prefix_cache_mb, prompts_per_step, timeout, allow_origins,
):  # fmt: skip
    """Serve the model over an OpenAI-compatible API with per-request steering, and a lab page."""
    import warnings

    from pertoken.commands.steering import _named_vectors
    from pertoken.errors import PertokenWarning
    from pertoken.rows import check_capture_rows, parse_layers
    from pertoken.serve.app import ServeConfig
    from pertoken.serve.request import Limits
    from pertoken.serve.server import check_host, is_loopback, serve_forever
    from pertoken.serve.traces import TraceStores
    from pertoken.vectors import load_vector

    _check_options(
        max_tokens, max_batch, max_body, prefix_cache_mb, prompts_per_step, timeout, allow_origins
    )
    check_host(host, api_key)
    files = _named_vectors(vectors)
    loaded = {name: load_vector(path) for name, path in files.items()}
    stores = TraceStores(list(traces)) if traces else None
    bk = options.load_model(ModelChoice(model, backend, dtype, device))
    for name, vec in loaded.items():
        vec.check_model(bk.n_layers, bk.hidden_size, files[name])
    for line in stores.check_model(bk.model_id) if stores else []:
        warnings.warn(line, PertokenWarning, stacklevel=1)  # one yellow line each
    rows = parse_layers(layers) if layers else ([bk.n_layers // 2] if loaded else [])
    check_capture_rows(rows, bk.n_layers)
    config = ServeConfig(
        names=[bk.model_id] + ([model] if model != bk.model_id else []),
        vectors=loaded,
        layers=rows,
        limits=Limits(max_tokens=max_tokens, max_slots=max_batch),
        api_key=api_key,
        max_body=max_body,
        traces=stores,
        prefix_cache_mb=prefix_cache_mb,
        prompts_per_step=prompts_per_step,
        timeout=timeout,
        allow_origins=list(allow_origins),
    )
    where = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
    click.echo(f"serving {bk.model_id} ({bk.name}, {bk.dtype}) at {where}/v1; lab page at {where}/")
    if loaded:
        click.echo(f"vectors: {', '.join(loaded)}; monitored rows: {','.join(map(str, rows))}")
    if not is_loopback(host):
        click.echo(f"listening beyond this machine on {host}: clients must send the API key")
    serve_forever(bk, config, host=host, port=port)


def _check_options(max_tokens, max_batch, max_body, prefix_mb, per_step, timeout, origins) -> None:
    """Values that would leave every request hanging or refused, caught before the model loads."""
    from urllib.parse import urlsplit

    from pertoken.errors import PertokenError

    for name, value, least in [
        ("--max-tokens", max_tokens, 1), ("--max-batch", max_batch, 1),
        ("--max-body", max_body, 1024), ("--prompts-per-step", per_step, 1),
    ]:  # fmt: skip
        if value < least:
            raise PertokenError(f"{name} {value} is below {least}: leave it out for the default")
    if not 0 <= prefix_mb < float("inf"):
        raise PertokenError(
            f"--prefix-cache-mb {prefix_mb} must be a number of megabytes, 0 or more (0: off)"
        )
    if not timeout > 0:
        raise PertokenError(f"--timeout {timeout} must be a positive number of seconds")
    for origin in origins:
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
            raise PertokenError(
                f"--allow-origin {origin!r} is not an origin: give scheme, host and port, "
                "as in https://lab.example:8443"
            )


COMMANDS = [serve]
