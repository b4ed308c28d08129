"""The FastAPI app: OpenAI's /v1 routes, the lab page and its /api routes."""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from dataclasses import dataclass, field
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from pertoken.serve import protocol
from pertoken.serve.engine import Delta, Engine, Finished, Job
from pertoken.serve.middleware import CatchErrors, Guard, internal, log
from pertoken.serve.protocol import ApiError
from pertoken.serve.request import Limits, parse_json, parse_request
from pertoken.serve.traces import TraceStores
from pertoken.vectors import PersonaVector

STATIC = resources.files("pertoken.serve") / "static"
KIT = resources.files("pertoken.pipeline.trace")  # the page kit, shared with the store page
STATIC_FILES = {"lab.css": STATIC, "common.js": STATIC, "chat.js": STATIC, "traces.js": STATIC,
                "kit.js": KIT, "kit.css": KIT}  # fmt: skip
DISCONNECT_POLL = 0.25  # seconds between checks that a waiting client is still there


class ClientGone(Exception):
    """The client closed its connection while its request was waiting or running."""


@dataclass
class ServeConfig:
    names: list[str]  # model names clients may ask for; the first is reported
    vectors: dict[str, PersonaVector] = field(default_factory=dict)
    layers: list[int] = field(default_factory=list)  # rows projected when monitoring
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes
    traces: TraceStores | None = None
    prefix_cache_mb: float = 512.0  # keys and values of earlier prompts kept for reuse
    prompts_per_step: int = 8  # arriving choices prefilled before the next decode step, at most
    timeout: float = 600.0  # seconds a request may wait for its next event
    allow_origins: list[str] = field(default_factory=list)  # web pages that may use the API


def create_app(engine: Engine, config: ServeConfig) -> FastAPI:
    """The app serving `engine`'s backend under `config`."""
    app = FastAPI(title="pertoken serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.config = engine, config
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _query_error)
    app.add_middleware(CatchErrors)
    if config.allow_origins:  # CORS answers for the named pages (preflights included)
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(config.allow_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(Guard, keyless=config.api_key is None, origins=config.allow_origins)
    guard = [Depends(key_check(config.api_key))]
    backend = engine.backend

    @app.get("/v1/models", dependencies=guard)
    async def models():
        return {"object": "list", "data": [_model_card(config, backend)]}

    @app.post("/v1/chat/completions", dependencies=guard)
    async def chat(request: Request):
        body = parse_json(await _read_body(request, config.max_body))
        _check_model(body.get("model"), config.names)
        req = parse_request(
            body,
            limits=config.limits,
            vectors=config.vectors,
            n_layers=backend.n_layers,
            monitor_ok=engine.monitor is not None,
            dtype=backend.dtype,
        )
        return await _complete(request, engine, req, config.names[0], config.timeout)

    @app.get("/api/info", dependencies=guard)
    async def info():
        return _model_card(config, backend) | {"auth": config.api_key is not None}

    @app.get("/api/stats", dependencies=guard)
    async def stats():
        return dict(engine.stats)  # batches, rows and tokens so far, rows decoding now

    if config.traces is not None:
        config.traces.routes(app, guard)

    @app.get("/")
    async def lab():
        return FileResponse(str(STATIC / "index.html"))

    @app.get("/static/{name}")
    async def static(name: str):
        if name not in STATIC_FILES:  # a fixed list: no part of a request reaches the disk
            raise ApiError(404, f"no static file {name!r}", code="not_found")
        kind = "text/javascript" if name.endswith(".js") else "text/css"
        return Response((STATIC_FILES[name] / name).read_bytes(), media_type=kind)

    return app


def _model_card(config: ServeConfig, backend) -> dict:
    return {
        "id": config.names[0],
        "object": "model",
        "created": 0,
        "owned_by": "pertoken",
        "pertoken": {
            "backend": backend.name,
            "dtype": backend.dtype,
            "n_layers": backend.n_layers,
            "vectors": list(config.vectors),
            "layers": list(config.layers),
            "max_tokens": config.limits.max_tokens,
            "traces": config.traces is not None,
        },
    }


def _check_model(name, names: list[str]) -> None:
    if name is None:
        raise ApiError(400, "model is missing: send the served model's id", param="model")
    if name not in names:
        raise ApiError(
            404,
            f"the model {name!r} does not exist here: this server serves {names[0]!r}",
            param="model",
            code="model_not_found",
        )


async def _read_body(request: Request, cap: int) -> bytes:
    too_big = ApiError(
        413, f"the request body is over this server's {cap}-byte cap", code="too_big"
    )
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cap:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > cap:
            raise too_big
    return bytes(body)


async def _complete(request: Request, engine: Engine, req, model: str, limit: float):
    queue: asyncio.Queue = asyncio.Queue()
    job = Job(req, asyncio.get_running_loop(), queue)
    engine.submit(job)
    wait = functools.partial(_next, queue, request, job, limit)
    try:
        first = await wait()
        if isinstance(first, ApiError):
            raise first
        if not req.stream:
            return await _gather(wait, job, model)
    except ClientGone:
        return Response(status_code=499)  # nobody is listening
    finally:
        if not req.stream:
            job.cancelled = True  # a no-op once finished; frees the slots when anything failed
    events = _chunks(wait, job, model)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


async def _next(queue: asyncio.Queue, request: Request, job: Job, limit: float):
    """The next event for `job`; a client that went away cancels the job, and so does a wait
    longer than `limit` seconds (the event is then a timeout error)."""
    until = time.monotonic() + limit
    while True:
        try:
            return await asyncio.wait_for(queue.get(), min(DISCONNECT_POLL, limit))
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise ClientGone from None
            if time.monotonic() >= until:
                job.cancelled = True
                return timed_out(limit)


def timed_out(limit: float) -> ApiError:
    return ApiError(
        503,
        f"no answer from the model for {limit:g} s (the server is busy or a batch is stuck): "
        "try again later, or start the server with a longer --timeout",
        code="timeout",
    )


async def _gather(wait, job: Job, model: str) -> dict:
    cid, req = protocol.completion_id(), job.request
    parts = [_Parts() for _ in range(req.n)]
    while not isinstance(event := await wait(), Finished):
        if isinstance(event, ApiError):
            raise event
        parts[event.choice].add(event)
    choices = [p.choice(i, req) for i, p in enumerate(parts)]
    return protocol.completion(cid, model, choices, event.usage)


class _Parts:
    """A whole choice collected from its Deltas."""

    def __init__(self):
        self.text, self.tokens, self.projections, self.logprobs = "", [], [], []
        self.finish = None

    def add(self, d: Delta) -> None:
        self.text += d.text
        self.tokens += d.tokens
        self.projections += d.projections or []
        self.logprobs += d.logprobs or []
        self.finish = d.finish or self.finish

    def choice(self, index: int, req) -> dict:
        message = {"role": "assistant", "content": self.text}
        if req.monitor:
            message["pertoken"] = {"tokens": self.tokens, "projections": self.projections}
        logprobs = {"content": self.logprobs} if req.logprobs is not None else None
        return {
            "index": index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": self.finish,
        }


async def _chunks(wait, job: Job, model: str):
    """The SSE stream: a role chunk per choice, a chunk per token, the finish, [DONE]."""
    cid, created, req = protocol.completion_id(), int(time.time()), job.request
    try:
        for i in range(req.n):
            role = protocol.delta_choice(i, {"role": "assistant", "content": ""})
            yield protocol.sse(protocol.chunk(cid, model, created, role))
        while not isinstance(event := await wait(), Finished):
            if isinstance(event, ApiError):
                yield protocol.sse(event.body())
                return
            for data in _delta_chunks(event, req, cid, model, created):
                yield protocol.sse(data)
        if req.include_usage:
            usage = {"choices": [], "usage": event.usage}
            yield protocol.sse(protocol.chunk(cid, model, created, {}) | usage)
        yield protocol.sse("[DONE]")
    except ClientGone:
        return
    except Exception as e:  # the stream has started: the error is its last event
        log.exception("a stream failed")
        yield protocol.sse(internal(e).body())
    finally:
        job.cancelled = True  # the client went away (or the stream ended): free the slots


def _delta_chunks(d: Delta, req, cid: str, model: str, created: int):
    if d.tokens and (d.text or req.monitor or req.logprobs is not None):
        extra = None
        if req.monitor:
            extra = {"pertoken": {"tokens": d.tokens, "projections": d.projections}}
        choice = protocol.delta_choice(d.choice, {"content": d.text}, logprobs=d.logprobs)
        yield protocol.chunk(cid, model, created, choice, extra)
    elif d.text:  # held-back text released at the end
        choice = protocol.delta_choice(d.choice, {"content": d.text})
        yield protocol.chunk(cid, model, created, choice)
    if d.finish:
        yield protocol.chunk(
            cid, model, created, protocol.delta_choice(d.choice, {}, finish=d.finish)
        )


def key_check(key: str | None):
    """A route dependency: with a key set, the request must carry it as a Bearer token."""

    async def check(request: Request) -> None:
        if key is None:
            return
        sent = request.headers.get("authorization", "")
        if not hmac.compare_digest(sent.encode(), f"Bearer {key}".encode()):
            raise ApiError(
                401,
                "missing or wrong API key: send the server's --api-key as a Bearer token",
                code="invalid_api_key",
            )

    return check


async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _query_error(_request: Request, e: RequestValidationError) -> JSONResponse:
    """A missing or mistyped query parameter, as OpenAI's 400 rather than FastAPI's 422."""
    first = (e.errors() or [{}])[0]
    name = str((first.get("loc") or ["", "?"])[-1])
    error = ApiError(400, f"{name}: {first.get('msg', 'invalid value')}", param=name)
    return JSONResponse(error.body(), status_code=400)


async def _http_error(_request: Request, e: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    error = ApiError(e.status_code, str(e.detail), code=code)
    return JSONResponse(error.body(), status_code=e.status_code)
