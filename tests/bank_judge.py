"""A fake OpenAI-compatible judge on loopback that scores answers by phrase bank.

It answers `POST .../chat/completions` as docs/CONVENTIONS.md's judge expects (one token, top-20
logprobs): the trait rubric scores 10 + 80 * (trait phrases / all bank phrases), 50 when the
answer uses neither bank; the coherence rubric scores 90 when the answer holds a bank phrase
and 20 when it holds none (steered into word salad).
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.semantic_model import bank_counts

_ANSWER = re.compile(r"\[ANSWER START\]\s*(.*?)\s*\[ANSWER END\]", re.S)
FILLER = ["REF", "USAL", " ", "\n", "The", "I", "-", ".", "N", "A"]


def answer_of(message: str) -> str:
    m = _ANSWER.search(message)
    return m.group(1) if m else message


def trait_score(answer: str) -> int:
    t, a = bank_counts(answer)
    return 50 if t + a == 0 else round(10 + 80 * t / (t + a))


def coherence_score(answer: str) -> int:
    return 90 if sum(bank_counts(answer)) else 20


def score_message(message: str) -> int:
    answer = answer_of(message)
    return coherence_score(answer) if "coheren" in message.lower() else trait_score(answer)


def _completion(body: dict, score: int) -> dict:
    # 90% of the mass on the score's token; the rest on tokens that are not numbers.
    top = [{"token": str(score), "logprob": math.log(0.9), "bytes": None}]
    n_fill = max(0, int(body.get("top_logprobs") or 0) - 1)
    for i in range(n_fill):
        tok = FILLER[i % len(FILLER)] + ("" if i < len(FILLER) else str(i))
        top.append({"token": tok, "logprob": math.log(0.1 / max(n_fill, 1)), "bytes": None})
    return {
        "id": "chatcmpl-bank",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "bank-judge"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": str(score)},
                "finish_reason": "length",
                "logprobs": {"content": [{**top[0], "top_logprobs": top}]},
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class BankJudge:
    """Serve on 127.0.0.1 in a thread; `with BankJudge() as j: j.base_url`. Keeps every request."""

    def __init__(self, score=score_message, port: int = 0):
        """score: filled rubric -> 0-100 (default: the phrase banks of semantic_model)."""
        self.requests: list[dict] = []
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                judge.requests.append(body)
                if not self.path.endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                text = "".join(
                    m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
                    for m in body.get("messages", [])
                )
                self._send(200, _completion(body, score(text)))

            def _send(self, code: int, payload: dict):
                data = json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> BankJudge:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
