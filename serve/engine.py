"""The serving worker: one thread owns the backend and one long-lived slot loop.

A request's choices enter the loop as entries at the next step after it arrives (each with its
own steering, sampling, seed, logit bias, monitor and logprobs) and leave it when they end; a
per-token callback turns tokens into Deltas and hands them to each request's asyncio queue. A
request whose client went away frees its slots at the next step."""

from __future__ import annotations

import asyncio
import secrets
import threading
from dataclasses import dataclass, field

import numpy as np

from pertoken.backends.base import Sampling, TokenStep, slot_uniforms
from pertoken.backends.conditions import decide_one
from pertoken.backends.generation import Entry
from pertoken.backends.prefix_cache import PrefixCache
from pertoken.backends.schedule import prompt_seeds
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
    ids: list[int] = field(default_factory=list)  # the templated prompt's tokens

    def send(self, event) -> None:
        """Hand one event to the request's handler (from any thread)."""
        post([(self, event)])

    left: int = 0  # choices still decoding
    entries: list = field(default_factory=list)  # one per choice, in the slot loop


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


def fail(jobs, e: Exception) -> None:
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
        max_slots: int = 32,
        length: int = 256,  # positions a slot holds at first (its cache grows as needed)
        prefix_cache_mb: float = 0.0,
        prompts_per_step: int = 8,  # choices that join the loop before its next step, at most
    ):
        self.backend, self.monitor, self.max_slots = backend, monitor, max_slots
        self.prompts_per_step = prompts_per_step
        self.length = length
        self.pending: list[Job] = []
        self.cond = threading.Condition()
        self.closed = False
        self.stats = {"batches": 0, "rows": 0, "tokens": 0, "active_rows": 0, "steps": 0,
                      "prefilled_tokens": 0}  # fmt: skip
        self._token_texts: dict[int, str] = {}
        self.outbox: list[tuple[Job, object]] = []
        self.held: set[Job] = set()  # jobs with entries in the loop
        self.loop = None
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.thread = threading.Thread(target=self._work, name="pertoken-engine", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closed:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            self.pending.append(job)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    # ------------------------------------------------------------------ worker thread
    def _work(self) -> None:
        while (jobs := self._take()) is not None:
            for job in jobs:
                try:
                    if not job.cancelled and self._admit(job):
                        self._insert(job)
                except Exception as e:  # a bug or a backend failure: this request fails
                    self.held.discard(job)
                    fail([job], e)
            if self.loop is not None and self.loop.busy:
                self._step()
        with self.cond:
            left, self.pending = self.pending, []
        for job in left + list(self.held):
            job.send(ApiError(503, "the server is shutting down", code="shutting_down"))

    def _take(self) -> list[Job] | None:
        """The requests that arrived since the last step, in order, up to `prompts_per_step`
        choices (at least one request): a burst joins over several steps, so the answers
        already running go on and the first of the burst start sooner. Waits while idle."""
        with self.cond:
            idle = self.loop is None or not self.loop.busy
            while idle and not self.pending and not self.closed:
                self.cond.wait()
            if self.closed:
                return None
            jobs, n = [], 0
            for job in self.pending:
                if jobs and n + job.request.n > self.prompts_per_step:
                    break
                jobs.append(job)
                n += job.request.n
            self.pending = self.pending[len(jobs) :]
            return jobs

    def _step(self) -> None:
        """One step of the loop; an exception fails the requests it holds with a 500 and
        the engine goes on with a fresh loop."""
        self.stats["steps"] += 1
        for job in self.held:
            if job.cancelled:  # the client went away: its slots are freed at this step
                for e in job.entries:
                    e.cancelled = True
        try:
            self.loop.step()
        except Exception as e:
            fail(list(self.held), e)
            self.held.clear()
            self.loop, self.outbox = None, []
        self.stats["active_rows"] = sum(j.left for j in self.held)

    def _admit(self, job: Job) -> bool:
        """Template and count the prompt; a prompt the model cannot hold is refused."""
        try:
            job.prompt = self.backend.chat_messages(job.request.messages)
            job.ids = self.backend.encode(job.prompt)
            job.prompt_tokens = len(job.ids)
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

    def _slots(self):
        if self.loop is None:
            rows = self.monitor.rows if self.monitor else []
            self.loop = self.backend._slots(
                self.max_slots, rows, self.length, self._flush, prefix=self.prefix
            )
        return self.loop

    def _insert(self, job: Job) -> None:
        """One entry per choice, each with its own seed's draws; `when` steering is decided
        once on the prompt (one extra forward) before the entries go in."""
        r, loop = job.request, self._slots()
        seed = r.seed if r.seed is not None else secrets.randbits(31)
        sampling = Sampling(r.temperature, r.top_p, seed=seed, logit_bias=r.logit_bias)
        ids = job.ids
        plan = decide_one(self.backend, ids, r.steer)
        seeds = prompt_seeds(seed, r.n)
        draws = None if sampling.greedy else slot_uniforms(seeds, r.max_tokens)
        job.left = r.n
        self.held.add(job)
        self.stats["batches"] += 1
        self.stats["rows"] += r.n
        for i, choice in enumerate(job.choices):
            job.entries.append(
                Entry(
                    ids=ids, sampling=sampling, max_new_tokens=r.max_tokens,
                    on_end=self._ended(job), plan=plan,
                    uniforms=None if draws is None else draws[i], prompt=i,
                    on_step=self._on_step(job, choice),
                    hidden=bool(r.monitor and self.monitor), logprobs=r.logprobs,
                    key=(tuple(ids), id(plan), id(job)),
                )
            )  # fmt: skip
            loop.insert(job.entries[-1])

    def _on_step(self, job: Job, choice: Choice):
        def on_step(step: TokenStep) -> bool:
            self.stats["tokens"] += 1
            if job.cancelled:
                return False
            self.outbox.append((job, choice.add(step)))
            return choice.finish is None

        return on_step

    def _ended(self, job: Job):
        def ended(entry: Entry) -> None:
            self.stats["prefilled_tokens"] += entry.prefilled
            job.left -= 1
            if job.left == 0 and job in self.held:
                self.held.discard(job)
                self.outbox.extend(self._finish(job))

        return ended

    def _flush(self) -> None:
        """A step's events for every request, in one hand-over per event loop."""
        out, self.outbox = self.outbox, []
        post(out)

    def _finish(self, job: Job) -> list[tuple[Job, object]]:
        """The last events of a job: each unfinished choice's end, then the usage."""
        ends = [(job, c.end()) for c in job.choices if c.finish is None]
        done = sum(c.count for c in job.choices)
        usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": done}
        if job.entries:  # OpenAI's count of prompt tokens read from the prefix cache
            cached = job.prompt_tokens - max(e.prefilled for e in job.entries)
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
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
