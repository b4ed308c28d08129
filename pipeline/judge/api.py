"""The API judge: the official `openai` client against OpenAI or any compatible server.

Async with a bounded number of requests in flight. Rate limits (429) and server errors (5xx)
are retried with exponential backoff (honouring Retry-After); timeouts and refused
connections are retried too, but `max_consecutive_failures` retries in a row that time out or
find no server stop the run: a server that hangs costs two timeouts, not hours. A first try's
failure does not count, so a burst of dropped connections under load is retried, not fatal.
An answer that is not a chat completion with finite top logprobs is a failure (never cached),
not a refusal. The API key and any user:password in the base URL never leave memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

from pertoken.errors import PertokenError
from pertoken.pipeline.judge.scoring import aggregate_score, number_probs

KEY_ENV = "OPENAI_API_KEY"
OPENAI_URL = "https://api.openai.com/v1"
OFFLINE = (
    "or judge offline: --base-url URL (an OpenAI-compatible server such as vLLM, "
    "mlx_lm.server or Ollama) or --judge local:MODEL"
)
_shared_limit = None  # see shared_limit
NOT_A_COMPLETION = (
    "is not a chat completion with logprobs (HTML, malformed JSON or empty top_logprobs): "
    "check that --base-url is the /v1 endpoint of an OpenAI-compatible server"
)


def api_key(base_url: str | None) -> str:
    """OPENAI_API_KEY from the environment or a .env file; a local server needs none."""
    from dotenv import find_dotenv, load_dotenv

    load_dotenv(find_dotenv(usecwd=True), override=False)
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key
    if base_url:
        return "unused"  # OpenAI-compatible local servers ignore the key
    raise PertokenError(
        f"no {KEY_ENV} for the OpenAI judge: set it in the environment or a .env file, {OFFLINE}"
    )


def redact_url(url: str | None) -> str | None:
    """`url` without its user:password part (http://user:pw@host/v1 -> http://host/v1)."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def endpoint(base_url: str | None) -> str:
    """The server an API judge talks to, without credentials (OpenAI's when none is given)."""
    url = base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL
    return redact_url(url).rstrip("/")


def redact(text: str, key: str, base_url: str | None = None) -> str:
    """Remove the key, anything that looks like one, and the base URL's user:password."""
    if key and key != "unused":
        text = text.replace(key, "***")
    if base_url and "@" in urlsplit(base_url).netloc:
        parts = urlsplit(base_url)
        userinfo = parts.netloc.rpartition("@")[0]
        for secret in filter(None, (userinfo, parts.password or parts.username)):
            text = text.replace(secret, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-*]{3,}", "***", text)


def check_endpoint(base_url: str | None, *, timeout: float = 10.0) -> None:
    """Before hours of work: the key is there and the server answers (GET /models)."""
    import openai

    key = api_key(base_url)
    client = openai.OpenAI(api_key=key, base_url=base_url, timeout=timeout, max_retries=0)
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.APIConnectionError) as e:
        raise _fatal_error(e, endpoint(base_url), None) from None
    except (openai.APIStatusError, ValueError):
        pass  # it answered; some servers have no /models
    finally:
        client.close()


@contextlib.contextmanager
def shared_limit(limit):
    """API judges made in this block also hold a slot of `limit` (an async context manager,
    such as a sweep's SharedLimit) for each request: one limit across processes."""
    global _shared_limit
    old, _shared_limit = _shared_limit, limit
    try:
        yield
    finally:
        _shared_limit = old


class _NoLogprobs(Exception):
    """The server ignores logprobs=True: no answer from it can be scored."""


def top_logprobs(resp) -> list[tuple[str, float]]:
    """(token, logprob) of the first answer token; ValueError when the answer is malformed."""
    try:
        choice = resp.choices[0]
        if choice.logprobs is None:
            raise _NoLogprobs
        top = [(t.token, float(t.logprob)) for t in choice.logprobs.content[0].top_logprobs]
    except (AttributeError, IndexError, TypeError, ValueError):
        raise ValueError("the answer " + NOT_A_COMPLETION) from None
    if not top or any(not isinstance(tok, str) or math.isnan(lp) or lp > 0.01 for tok, lp in top):
        raise ValueError("the answer's top_logprobs are empty or not log-probabilities")
    return top


class ApiJudge:
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        concurrency: int = 32,
        timeout: float = 60.0,
        max_retries: int = 6,
        max_consecutive_failures: int = 8,
    ):
        self.model, self.base_url = model, base_url
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.max_consecutive_failures = max_consecutive_failures
        self.key = api_key(base_url)
        self.where = endpoint(base_url)
        self.requests = 0
        self.no_answer = 0  # retries in a row that timed out or found no server
        self.limit = _shared_limit or contextlib.nullcontext()

    def run(
        self,
        items: list[tuple[str, str]],
        on_done: Callable[[str, float | None], None],
        on_fail: Callable[[str, str], None],
        on_retry: Callable[[str], None] | None = None,
    ) -> None:
        """Score each (key, judge prompt); on_done(key, score|None) or on_fail(key, reason).

        on_retry(what) is told of each attempt that will be tried again (`timeout`, `429`)."""
        if items:
            self.on_retry = on_retry or (lambda what: None)
            _run_coroutine(self._run(items, on_done, on_fail))

    async def _run(self, items, on_done, on_fail):
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.concurrency)
        # retries are ours: the client cannot stop a run after consecutive timeouts
        client = AsyncOpenAI(
            api_key=self.key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )
        async with client:
            tasks = [
                asyncio.create_task(self._one(client, sem, key, text, on_done, on_fail))
                for key, text in items
            ]
            finished, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for t in finished:
                if t.exception() is not None:
                    raise t.exception()

    async def _one(self, client, sem, key, text, on_done, on_fail):
        async with sem, self.limit:
            for attempt in range(self.max_retries + 1):
                score, reason, wait = await self._attempt(client, text, attempt)
                if wait is None or attempt == self.max_retries:
                    break
                self.on_retry(reason.split(":")[0])
                await asyncio.sleep(wait)
        if reason is None:
            on_done(key, score)
        else:
            on_fail(key, self._redact(reason)[:300])

    async def _attempt(self, client, text, attempt):
        """(score, None, None) on an answer; (None, reason, seconds to wait | None to give up)."""
        import openai

        self.requests += 1
        try:
            resp = await client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": text}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=20,
                seed=0,
            )
        except (openai.RateLimitError, openai.InternalServerError) as e:
            self.no_answer = 0  # the server is there, only busy or failing
            return None, f"{e.status_code}: {type(e).__name__}: {e}", _backoff(attempt, e)
        except openai.APIConnectionError as e:  # no answer at all: a timeout or no connection
            self._no_answer(e, attempt)
            what = "timeout" if isinstance(e, openai.APITimeoutError) else "connection"
            return None, f"{what}: {type(e).__name__}: {e}", _backoff(attempt)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            return None, f"{type(e).__name__}: {e}", None
        except openai.APIError as e:
            raise _fatal_error(e, self.where, self) from None
        except ValueError:  # a 200 whose body is not JSON
            return None, f"the answer from {self.where} {NOT_A_COMPLETION}", None
        self.no_answer = 0
        return self._score(resp)

    def _score(self, resp):
        try:
            return aggregate_score(number_probs(top_logprobs(resp))), None, None
        except _NoLogprobs:
            raise PertokenError(
                f"the judge {self.model!r} returned no logprobs: use a server and model that "
                "support logprobs=True with top_logprobs (OpenAI, vLLM, mlx_lm.server), " + OFFLINE
            ) from None
        except ValueError as e:
            return None, f"{e} (from {self.where})", None

    def _no_answer(self, e, attempt: int) -> None:
        """Count a retry that timed out or found no server; too many in a row stop the run."""
        import openai

        self.no_answer += attempt > 0
        n = self.max_consecutive_failures
        if self.no_answer < n:
            return
        if isinstance(e, openai.APITimeoutError):
            what = f"timed out ({self.timeout:g}s each) on {n} retried requests in a row"
        else:
            what = f"could not be reached on {n} retried requests in a row ({type(e).__name__})"
        raise PertokenError(
            f"the judge at {self.where} {what}: check that the server is up and --base-url, or "
            f"raise --max-consecutive-failures; scores already received are cached"
        )

    def _redact(self, text: str) -> str:
        return redact(text, self.key, self.base_url)


def _backoff(attempt: int, e=None) -> float:
    """Seconds before the next try: the server's Retry-After, else 0.5 * 2^attempt (max 8)."""
    headers = getattr(getattr(e, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            return min(float(headers[name]) * scale, 60.0)
        except (KeyError, ValueError):
            pass
    return min(0.5 * 2**attempt, 8.0) * random.uniform(0.75, 1.0)


def _fatal_error(e, where: str, judge: ApiJudge | None) -> PertokenError:
    import openai

    if isinstance(e, openai.AuthenticationError):
        msg = f"the judge server at {where} rejected the API key (401): check {KEY_ENV}, "
        return PertokenError(msg + OFFLINE)
    if isinstance(e, openai.NotFoundError) and judge is not None:
        return PertokenError(
            f"the judge server at {where} has no model {judge.model!r} (404): check "
            "--judge-model and --base-url"
        )
    if isinstance(e, openai.APIConnectionError):
        return PertokenError(
            f"cannot reach the judge at {where} ({type(e).__name__}): check the network "
            f"or --base-url, {OFFLINE}"
        )
    text = f"the judge failed: {type(e).__name__}: {e}"
    return PertokenError((judge._redact(text) if judge else redact(text, ""))[:400])


def _run_coroutine(coro) -> None:
    """asyncio.run, or in a worker thread when a loop already runs here (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
