"""A fake OpenAI-compatible chat server on loopback, for the real `openai` client to talk to.

`reply(body, n)` (set by a test) decides each answer from the request body and the request's
ordinal: a list of (token, probability) for top_logprobs, or an int HTTP status (429, 500, 401),
optionally preceded by a delay: ("slow", seconds, reply). Broken servers: ("raw", content
type, body bytes) sends that body with status 200; ("top_logprobs", value) sends a completion
whose top_logprobs is `value` as it is (None, [], or [(token, logprob)] with NaN logprobs).
"""

from __future__ import annotations

import contextlib
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def default_reply(body: dict, n: int):
    text = body["messages"][0]["content"]
    return [("90", 0.9), ("80", 0.1)] if "coherent" in text else [("50", 0.7), ("40", 0.3)]


class FakeOpenAI:
    def __init__(self):
        self.reply = default_reply
        self.requests: list[dict] = []  # bodies, in arrival order
        self.headers: list[dict] = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.url = ""

    def count(self, needle: str) -> int:
        return sum(needle in r["messages"][0]["content"] for r in self.requests)


def _completion(model: str, top: list[tuple[str, float]]) -> dict:
    items = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in top]
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "length",
                "message": {"role": "assistant", "content": top[0][0]},
                "logprobs": {"content": [{**items[0], "top_logprobs": items}]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def _raw_top(model: str, top) -> dict:
    """A completion whose first token's top_logprobs is `top` unchanged (logprobs, not p)."""
    out = _completion(model, [("50", 1.0)])
    items = None if top is None else [{"token": t, "logprob": lp, "bytes": None} for t, lp in top]
    out["choices"][0]["logprobs"]["content"][0]["top_logprobs"] = items
    return out


def _handler(state: FakeOpenAI):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with state.lock:
                n = len(state.requests)
                state.requests.append(body)
                state.headers.append({k.lower(): v for k, v in self.headers.items()})
                state.inflight += 1
                state.max_inflight = max(state.max_inflight, state.inflight)
            try:
                self._answer(body, state.reply(body, n))
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and went away
            finally:
                with state.lock:
                    state.inflight -= 1

        def _answer(self, body, reply):
            if isinstance(reply, tuple) and reply[0] == "slow":
                time.sleep(reply[1])
                reply = reply[2]
            if isinstance(reply, tuple) and reply[0] == "raw":
                return self._send_bytes(200, reply[1], reply[2])
            if isinstance(reply, tuple) and reply[0] == "top_logprobs":
                return self._send(200, _raw_top(body["model"], reply[1]))
            if isinstance(reply, int):
                msg = {"error": {"message": f"fake error {reply}", "type": "x", "code": None}}
                if reply == 401:  # real servers echo part of the key; ours echoes all of it
                    msg["error"]["message"] = "Incorrect API key: " + self.headers["Authorization"]
                return self._send(reply, msg, {"retry-after-ms": "10"})
            self._send(200, _completion(body["model"], reply))

        def _send(self, code, payload, headers=None):
            self._send_bytes(code, "application/json", json.dumps(payload).encode(), headers)

        def _send_bytes(self, code, content_type, data, headers=None):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

    return Handler


@contextlib.contextmanager
def serve_fake_openai():
    state = FakeOpenAI()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
