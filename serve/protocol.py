"""OpenAI's wire shapes: errors, completions, streamed chunks and logprob entries."""

from __future__ import annotations

import json
import math
import time
import uuid


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, *, param=None, code=None, kind=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


LOGPROB_FLOOR = -9999.0  # OpenAI's logprob for a token too unlikely to have a number


def logprob_entry(token: str, logprob: float, top: list[tuple[str, float]] | None) -> dict:
    """One token of `choices[i].logprobs.content`."""
    entry = {"token": token, "logprob": _floor(logprob), "bytes": _bytes(token)}
    entry["top_logprobs"] = [
        {"token": t, "logprob": _floor(lp), "bytes": _bytes(t)} for t, lp in top or []
    ]
    return entry


def _floor(logprob: float) -> float:
    """-inf and NaN (a model whose numbers broke) have no place in JSON: the floor instead."""
    return max(float(logprob), LOGPROB_FLOOR) if math.isfinite(logprob) else LOGPROB_FLOOR


def _bytes(token: str) -> list[int] | None:
    # A token that is part of a character decodes to U+FFFD, whose bytes are not the token's.
    return None if "\ufffd" in token else list(token.encode("utf-8"))


def chunk(cid: str, model: str, created: int, choice: dict, extra: dict | None = None) -> dict:
    """One `chat.completion.chunk` holding one choice's delta."""
    out = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": [choice],
    }
    return out | (extra or {})


def delta_choice(index: int, delta: dict, *, logprobs=None, finish=None) -> dict:
    lp = {"content": logprobs} if logprobs is not None else None
    return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}


def completion(cid: str, model: str, choices: list[dict], usage: dict) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage,
    }


def sse(data: dict | str) -> bytes:
    """One server-sent event (`data: ...` and a blank line)."""
    # allow_nan=False: a non-finite number is an error here, never bare NaN in an event
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return f"data: {text}\n\n".encode()
