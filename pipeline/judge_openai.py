"""The API judge: the official `openai` client against OpenAI or any compatible server.

Async with a bounded number of requests in flight; the client retries rate limits, 5xx and
timeouts with exponential backoff (honouring Retry-After). The API key never leaves memory.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable

from pertoken.errors import PertokenError
from pertoken.pipeline.scoring import aggregate_score, number_probs

KEY_ENV = "OPENAI_API_KEY"
OFFLINE = (
    "or judge offline: --base-url URL (an OpenAI-compatible server such as vLLM, "
    "mlx_lm.server or Ollama) or --judge local:MODEL"
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


def redact(text: str, key: str) -> str:
    """Remove the key, and anything that looks like one, from a message."""
    if key and key != "unused":
        text = text.replace(key, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-*]{3,}", "***", text)


class ApiJudge:
    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        concurrency: int = 32,
        timeout: float = 60.0,
        max_retries: int = 6,
    ):
        self.model, self.base_url = model, base_url
        self.concurrency, self.timeout, self.max_retries = concurrency, timeout, max_retries
        self.key = api_key(base_url)
        self.requests = 0

    def run(
        self,
        items: list[tuple[str, str]],
        on_done: Callable[[str, float | None], None],
        on_fail: Callable[[str, str], None],
    ) -> None:
        """Score each (key, judge prompt); on_done(key, score|None) or on_fail(key, reason)."""
        if items:
            _run_coroutine(self._run(items, on_done, on_fail))

    async def _run(self, items, on_done, on_fail):
        from openai import AsyncOpenAI

        sem = asyncio.Semaphore(self.concurrency)
        client = AsyncOpenAI(
            api_key=self.key,
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=self.max_retries,
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
        import openai

        async with sem:
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
            except (
                openai.RateLimitError,
                openai.InternalServerError,
                openai.APITimeoutError,
                openai.BadRequestError,
                openai.UnprocessableEntityError,
            ) as e:
                on_fail(key, redact(f"{type(e).__name__}: {e}", self.key)[:300])
                return
            except openai.APIError as e:
                raise self._fatal(e) from None
        on_done(key, aggregate_score(number_probs(self._top_logprobs(resp))))

    def _top_logprobs(self, resp) -> list[tuple[str, float]]:
        choice = resp.choices[0] if resp.choices else None
        content = choice.logprobs.content if choice and choice.logprobs else None
        if not content:
            raise PertokenError(
                f"the judge {self.model!r} returned no logprobs: use a server and model that "
                "support logprobs=True with top_logprobs (OpenAI, vLLM, mlx_lm.server), " + OFFLINE
            )
        return [(t.token, t.logprob) for t in content[0].top_logprobs]

    def _fatal(self, e) -> PertokenError:
        import openai

        where = self.base_url or "api.openai.com"
        if isinstance(e, openai.AuthenticationError):
            msg = f"the judge server at {where} rejected the API key (401): check {KEY_ENV}, "
            return PertokenError(msg + OFFLINE)
        if isinstance(e, openai.NotFoundError):
            return PertokenError(
                f"the judge server at {where} has no model {self.model!r} (404): check "
                "--judge-model and --base-url"
            )
        if isinstance(e, openai.APIConnectionError):
            return PertokenError(
                f"cannot reach the judge at {where} ({type(e).__name__}): check the network "
                f"or --base-url, {OFFLINE}; scores already received are cached"
            )
        return PertokenError(redact(f"the judge failed: {type(e).__name__}: {e}", self.key)[:400])


def _run_coroutine(coro) -> None:
    """asyncio.run, or in a worker thread when a loop already runs here (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()
