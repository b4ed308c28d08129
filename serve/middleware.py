"""ASGI layers around the app: any failure a route lets through becomes a 500 in OpenAI's
shape on a connection that stays open."""

from __future__ import annotations

import logging

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
