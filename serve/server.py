"""Putting a server together and running it with uvicorn (in the foreground or a thread)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

import numpy as np

from pertoken.errors import PertokenError
from pertoken.serve.app import ServeConfig, create_app
from pertoken.serve.engine import Engine, Monitor
from pertoken.serve.middleware import is_loopback


def check_host(host: str, api_key: str | None) -> None:
    """Anything but loopback reaches other machines, so it needs a key; a blank key is none."""
    if api_key is not None and not api_key.strip():
        raise PertokenError(
            "--api-key is blank (or PERTOKEN_API_KEY is set to spaces): give a real key, or "
            "leave it out on 127.0.0.1"
        )
    if not is_loopback(host) and not api_key:
        raise PertokenError(
            f"--host {host} lets other machines use the model: add --api-key KEY (clients send "
            "it as a Bearer token), or keep the default --host 127.0.0.1"
        )


def monitor_of(config: ServeConfig) -> Monitor | None:
    """The directions [K, R, hidden] of the server's vectors at its layers, when it has both."""
    if not config.vectors or not config.layers:
        return None
    for name, vec in config.vectors.items():
        if np.any(np.linalg.norm(vec.data[config.layers], axis=-1) == 0):
            raise PertokenError(f"vector {name!r} is all zeros at one of layers {config.layers}")
    dirs = np.stack([v.data[config.layers] for v in config.vectors.values()]).astype(np.float32)
    return Monitor(list(config.layers), dirs)


@dataclass
class Running:
    """A server started in a background thread (tests, benchmarks)."""

    url: str
    engine: Engine
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.engine.close()


def build(backend, config: ServeConfig):
    """The engine and the app for `backend`."""
    engine = Engine(backend, monitor=monitor_of(config), max_slots=config.limits.max_slots,
                    prefix_cache_mb=config.prefix_cache_mb,
                    prompts_per_step=config.prompts_per_step)  # fmt: skip
    return engine, create_app(engine, config)


def start(backend, config: ServeConfig, *, host="127.0.0.1", port=0) -> Running:
    """Serve in a thread on `host`:`port` (0: any free port); returns once it accepts."""
    import uvicorn

    engine, app = build(backend, config)
    sock = _bind(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        threading.Event().wait(0.02)
    if not server.started:
        engine.close()
        raise PertokenError(f"the server could not start on {host}:{port}")
    name, bound = sock.getsockname()[:2]
    return Running(f"http://{_url_host(name)}:{bound}", engine, server, thread)


def serve_forever(backend, config: ServeConfig, *, host: str, port: int) -> None:
    """Serve until Ctrl-C (which ends the server normally: it holds no unfinished work)."""
    import uvicorn

    check_host(host, config.api_key)
    engine, app = build(backend, config)
    sock = _bind(host, port)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level="info", lifespan="off")).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the signal once it has shut down
        pass
    finally:
        engine.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, so asyncio turns Nagle off on each connection: uvicorn writes a response's
    # head and body separately, and Nagle with delayed ACKs would hold the body back 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PertokenError(
            f"cannot listen on {host}:{port} ({e.strerror}): pick another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
