"""The batching worker: one thread owns the backend and decodes requests together.

Requests that arrive together (until none has come for `window` seconds) and can share sampling
settings go into one `generate` call, each row with its own steering; a per-token callback
turns tokens into Deltas and hands them to each request's asyncio queue. A request whose client
went away ends its rows at the next token, and a batch ends when its last row does."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from pertoken.backends.base import Streaming, TokenStep
from pertoken.serve.choice import Choice, Delta
from pertoken.serve.protocol import ApiError
from pertoken.serve.request import ChatRequest


@dataclass
class Admitted:
    prompt_tokens: int


@dataclass
class Finished:
    usage: dict


@dataclass(eq=False)  # jobs are compared by identity: their fields hold numpy arrays
class Job:
    """One request on its way through the worker, with the event loop and queue of its handler."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    cancelled: bool = False
    choices: list[Choice] = field(default_factory=list)
    prompt: str = ""
    prompt_tokens: int = 0

    def send(self, event) -> None:
        """Hand one event to the request's handler (from any thread)."""
        post([(self, event)])

    @property
    def key(self) -> tuple:
        """Jobs with equal keys can share a batch (one sampler for the whole batch)."""
        r = self.request
        if r.temperature == 0:
            return ("greedy",)
        if r.seed is not None:  # a seeded sample is reproducible only alone
            return ("seeded", id(self))
        return ("sample", r.temperature, r.top_p)


def post(items: list[tuple[Job, object]]) -> None:
    """Hand events to their jobs' queues: one call into each event loop, however many."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, event in items:
        by_loop.setdefault(job.loop, []).append((job, event))
    for loop, mine in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, mine)
        except RuntimeError:  # the event loop is gone: the server is stopping
            pass


def _deliver(items: list[tuple[Job, object]]) -> None:
    for job, event in items:
        job.queue.put_nowait(event)


def failure(e: Exception) -> ApiError:
    """A 500 in OpenAI's shape for an exception inside the engine (one line)."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return ApiError(500, f"generation failed: {text}", code="server_error")


def fail(jobs: list[Job], e: Exception) -> None:
    """End `jobs` with the 500 for `e` (the engine itself goes on)."""
    post([(job, failure(e)) for job in jobs])


@dataclass
class Monitor:
    rows: list[int]  # the server's --layers
    directions: np.ndarray  # [K, R, hidden] float32, in the order of its --vectors


class Engine:
    def __init__(
        self,
        backend,
        *,
        monitor: Monitor | None = None,
        max_rows: int = 32,
        window: float = 0.02,
    ):
        self.backend, self.monitor = backend, monitor
        self.max_rows, self.window = max_rows, window
        self.pending: list[Job] = []
        self.held: list[Job] = []  # jobs taken from pending and not yet finished
        self.last_arrival = 0.0
        self.cond = threading.Condition()
        self.closed = False
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "active_rows": 0}
        self._token_texts: dict[int, str] = {}
        self.thread = threading.Thread(target=self._work, name="pertoken-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            self.pending.append(job)
            self.last_arrival = time.monotonic()
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while True:
            try:
                if not self._cycle():
                    break
            except Exception as e:  # a bug or a backend failure: fail what it held, go on
                fail(self._drop_held(), e)
        with self.cond:
            left, self.pending = self.pending, []
        for job in left:
            job.send(ApiError(503, "the server is shutting down", code="shutting_down"))

    def _cycle(self) -> bool:
        """Take a batch and decode it; False once the engine is closed."""
        if (jobs := self._take()) is None:
            return False
        jobs = [j for j in jobs if not j.cancelled and self._admit(j)]
        if jobs:
            self._run(jobs)
        self.held = []
        return True

    def _drop_held(self) -> list[Job]:
        with self.cond:
            held, self.held = self.held, []
            self.pending = [j for j in self.pending if j not in held]
        return held

    def _take(self) -> list[Job] | None:
        """The next batch: the oldest job and those like it, once requests have stopped coming
        for `window` seconds (and at least `window` after the last batch, so its clients can
        send their next requests into this one), or the batch is full; at most 10 windows."""
        with self.cond:
            while not self.pending and not self.closed:
                self.cond.wait()
            start = time.monotonic()
            while not self.closed and _rows(self._fits()) < self.max_rows:
                quiet = max(self.last_arrival, start) + self.window
                left = min(quiet, start + 10 * self.window) - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            if self.closed:
                return None
            self.held = list(self.pending)  # until the batch is out of pending
            batch = self._fits()
            self.pending = [j for j in self.pending if j not in batch]
            self.held = batch
            return batch

    def _fits(self) -> list[Job]:
        key, batch, rows = self.pending[0].key, [], 0
        for job in self.pending:
            if job.key == key and rows + job.request.n <= self.max_rows:
                batch.append(job)
                rows += job.request.n
        return batch

    def _admit(self, job: Job) -> bool:
        """Template and count the prompt; a prompt the model cannot hold is refused."""
        try:
            job.prompt = self.backend.chat_messages(job.request.messages)
            job.prompt_tokens = len(self.backend.encode(job.prompt))
            _check_length(job, getattr(self.backend, "context_length", None))
        except ApiError as e:
            job.send(e)
            return False
        except Exception as e:  # a template that rejects the chat, say
            job.send(ApiError(400, f"could not template the messages: {e}", param="messages"))
            return False
        job.choices = [self._choice(job, i) for i in range(job.request.n)]
        job.send(Admitted(job.prompt_tokens))
        return True

    def _choice(self, job: Job, index: int) -> Choice:
        r = job.request
        return Choice(
            index,
            decode=self.backend.decode,
            token_text=self._token_text,
            max_tokens=r.max_tokens,
            stop=r.stop,
            directions=self.monitor.directions if (r.monitor and self.monitor) else None,
            logprobs=r.logprobs,
        )

    def _run(self, jobs: list[Job]) -> None:
        rows = [(job, c) for job in jobs for c in job.choices]  # batch row -> (job, choice)
        r = jobs[0].request
        self.stats["batches"] += 1
        self.stats["rows"] += len(rows)
        self.stats["active_rows"] = len(rows)
        try:
            self.backend.generate(
                [job.prompt for job, _ in rows],
                max_new_tokens=max(j.request.max_tokens for j in jobs),
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed if r.seed is not None else secrets.randbits(31),
                steer=[job.request.steer for job, _ in rows],
                batch_size=len(rows),
                stream=self._streaming(jobs, rows),
            )
        except Exception as e:
            fail(jobs, e)
            return
        finally:
            self.stats["active_rows"] = 0
        post([item for job in jobs for item in self._finish(job)])

    def _streaming(self, jobs: list[Job], rows: list[tuple[Job, Choice]]) -> Streaming:
        """Per-token reports for the batch: states when any job monitors, the most logprobs
        any job asked for; a row ends when its choice is finished or its client went away."""

        outbox: list[tuple[Job, Delta]] = []

        def on_step(step: TokenStep) -> bool:
            job, choice = rows[step.prompt]
            self.stats["tokens"] += 1
            if job.cancelled:
                return False
            outbox.append((job, choice.add(step)))
            return choice.finish is None

        def on_flush() -> None:  # a step's tokens for every request, in one hand-over
            post(outbox)
            outbox.clear()

        capture = self.monitor.rows if any(j.request.monitor for j in jobs) else []
        lps = [j.request.logprobs for j in jobs if j.request.logprobs is not None]
        return Streaming(on_step, capture, max(lps, default=None), on_flush)

    def _finish(self, job: Job) -> list[tuple[Job, object]]:
        """The last events of a job: each unfinished choice's end, then the usage."""
        ends = [(job, c.end()) for c in job.choices if c.finish is None]
        done = sum(c.count for c in job.choices)
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": done}
        return ends + [(job, Finished(usage | {"total_tokens": job.prompt_tokens + done}))]

    def _token_text(self, token_id: int) -> str:
        """A token's own text, special tokens included (for logprobs)."""
        text = self._token_texts.get(token_id)
        if text is None:
            tok = getattr(self.backend, "tokenizer", None)
            text = (
                tok.decode([token_id], skip_special_tokens=False)
                if tok is not None
                else self.backend.decode([token_id])
            )
            self._token_texts[token_id] = text
        return text


def _rows(jobs: list[Job]) -> int:
    return sum(j.request.n for j in jobs)


def _check_length(job: Job, context: int | None) -> None:
    """The prompt and the answer must fit the context; without max_tokens the answer gets
    what the context leaves, up to the cap."""
    if context is None:
        return
    r = job.request
    if not r.max_tokens_given:
        r.max_tokens = max(1, min(r.max_tokens, context - job.prompt_tokens))
    need = job.prompt_tokens + r.max_tokens
    if need > context:
        raise ApiError(
            400,
            f"this model's maximum context length is {context} tokens, but the request needs "
            f"{need} ({job.prompt_tokens} in the messages, {r.max_tokens} in the completion): "
            "shorten the messages or lower max_tokens",
            param="messages",
            code="context_length_exceeded",
        )


__all__ = ["Admitted", "Delta", "Engine", "Finished", "Job", "Monitor"]
