"""ASGI layers around the app: the checks that keep other web pages out of a keyless server,
and any failure a route lets through answered as a 500 in OpenAI's shape on a connection that
stays open."""

from __future__ import annotations

import ipaddress
import logging
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse

from pertoken.serve.protocol import ApiError

log = logging.getLogger("pertoken.serve")


def internal(e: Exception) -> ApiError:
    """A 500 for a failure of the server itself (one line; the traceback goes to its log)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return ApiError(500, f"the server failed on this request ({text}); its log has the details")


class CatchErrors:
    """Answers an exception that escaped a route with a JSON 500 instead of a plain-text one
    (Starlette's, which also makes the server close a keep-alive connection)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            log.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:  # half a response is out: only closing the connection can end it
                raise
            error = internal(e)
            await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)


class Guard:
    """What a browser on another site can make a keyless loopback server do: a "simple"
    cross-origin POST (text/plain, no preflight) and, through DNS rebinding, any request under
    a foreign Host name. Without a key, only loopback Host names and JSON bodies are served;
    with or without one, a foreign Origin is refused unless it is in `origins`."""

    def __init__(self, app, *, keyless: bool, origins: list[str]):
        self.app, self.keyless = app, keyless
        self.origins = {o.rstrip("/").lower() for o in origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (error := self.refusal(scope)):
            return await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, scope) -> ApiError | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "").lower()
        if self.keyless and not loopback_host(host):
            return ApiError(
                403,
                f"this server answers only at 127.0.0.1 or localhost, not {host!r}: start it "
                "with --api-key to reach it under another name",
                code="forbidden_host",
            )
        origin = headers.get("origin", "").rstrip("/").lower()
        if origin and urlsplit(origin).netloc != host and origin not in self.origins:
            return ApiError(
                403,
                f"requests from the web page at {origin} are refused: start the server with "
                f"--allow-origin {origin} to let that page use it",
                code="forbidden_origin",
            )
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if self.keyless and scope["method"] == "POST" and kind != "application/json":
            return ApiError(
                415,
                f"the body must be JSON, not {kind or 'untyped'}: send Content-Type: "
                "application/json",
                code="unsupported_media_type",
            )
        return None


def loopback_host(host: str) -> bool:
    """A Host header naming this machine: localhost or a loopback address, any port."""
    return is_loopback(host[1 : host.find("]")] if host.startswith("[") else host.rsplit(":", 1)[0])


def is_loopback(name: str) -> bool:
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
