"""The server's running slot loop: requests enter at the next step and leave as they end."""

import threading
import time

import torch

from pertoken.backends import load_backend
from tests.serve_helpers import ask, client, serving


def test_a_short_request_finishes_while_a_long_stream_runs(llama_dir, torch_one_thread):
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    bk.stop_ids = torch.tensor([-1])  # answers run to max_tokens
    done: dict[str, float] = {}
    with serving(bk, max_slots=2, max_tokens=300) as r:
        c = client(r)
        stream = c.chat.completions.create(
            model=bk.model_id, messages=ask("hi"), max_tokens=300, stream=True
        )
        chunks = iter(stream)
        for _ in range(3):
            next(chunks)  # the long answer is decoding

        def rest():
            n = sum(1 for _ in chunks)
            done["long"] = time.monotonic()
            done["n"] = n

        t = threading.Thread(target=rest)
        t.start()
        short = c.chat.completions.create(model=bk.model_id, messages=ask("yo"), max_tokens=4)
        done["short"] = time.monotonic()
        t.join(120)
    assert short.usage.completion_tokens == 4
    assert done["short"] < done["long"] and done["n"] > 0


def test_logit_bias_banning_the_stop_token_runs_to_max_tokens(llama_dir, torch_one_thread):
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    p = bk.chat_messages(ask("hi"))
    ids = bk.trace(p, rows=[1], max_new_tokens=12).token_ids
    k = next(k for k in range(1, 12) if ids[k] not in ids[:k])
    bk.stop_ids = torch.tensor([ids[k]])  # the greedy answer now ends after k tokens
    with serving(bk, max_tokens=12) as r:
        c = client(r)
        kw = dict(model=bk.model_id, messages=ask("hi"), max_tokens=12, temperature=0)
        plain = c.chat.completions.create(**kw)
        banned = c.chat.completions.create(**kw, logit_bias={str(ids[k]): -100})
    assert plain.usage.completion_tokens == k and plain.choices[0].finish_reason == "stop"
    assert banned.usage.completion_tokens == 12 and banned.choices[0].finish_reason == "length"


def test_seeded_samples_do_not_depend_on_what_runs_beside_them(llama_dir, torch_one_thread):
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    with serving(bk, max_tokens=10) as r:
        c = client(r)
        kw = dict(model=bk.model_id, messages=ask("hi"), max_tokens=10, temperature=1.0, seed=7)
        alone = c.chat.completions.create(**kw).choices[0].message.content
        got = []

        def one(seed):
            out = c.chat.completions.create(**(kw | {"seed": seed}))
            got.append((seed, out.choices[0].message.content))

        threads = [threading.Thread(target=one, args=(s,)) for s in (7, 8, 9)]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert dict(got)[7] == alone


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(llama_dir, torch_one_thread):
    import openai
    import pytest

    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    make, broken = type(bk)._slots, []

    def slots(self, *a, **kw):
        loop = make(self, *a, **kw)
        if not broken:  # the first loop breaks at its first step
            broken.append(loop)

            def boom():
                raise RuntimeError("out of memory")

            loop.step = boom
        return loop

    bk._slots = slots.__get__(bk)
    with serving(bk, max_tokens=4) as r:
        c = client(r)
        kw = dict(model=bk.model_id, messages=ask("hi"), max_tokens=4, temperature=0)
        with pytest.raises(openai.InternalServerError, match="generation failed"):
            c.chat.completions.create(**kw)
        ok = c.chat.completions.create(**kw)  # greedy: a sampled answer may stop early
    assert ok.usage.completion_tokens == 4


def test_a_burst_joins_the_loop_a_few_prompts_per_step(llama_dir, monkeypatch, torch_one_thread):
    """Five requests (one with n=3) waiting at once, two prompts per step: they enter as
    [2, 1, 3, 1] choices on four steps in a row (a request larger than the cap enters alone),
    and each gets its whole answer."""
    import asyncio

    from pertoken.serve.engine import Engine, Finished, Job
    from pertoken.serve.request import ChatRequest

    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    bk.stop_ids = torch.tensor([-1])  # answers run to max_tokens
    make, log = type(bk)._slots, []

    def slots(self, *a, **kw):
        loop = make(self, *a, **kw)
        insert, step = loop.insert, loop.step
        loop.insert = lambda e: (log.append(1), insert(e))[1]
        loop.step = lambda: (log.append(0), step())[1]
        return loop

    monkeypatch.setattr(type(bk), "_slots", slots)
    engine, events = Engine(bk, prompts_per_step=2), asyncio.new_event_loop()
    jobs = [Job(ChatRequest(ask("hi"), 5, n=n, temperature=0), events, asyncio.Queue())
            for n in (1, 1, 1, 3, 1)]  # fmt: skip
    with engine.cond:  # all five wait before the engine takes any
        for job in jobs:
            engine.submit(job)

    async def last(job):
        while not isinstance(event := await job.queue.get(), Finished):
            assert not isinstance(event, Exception), event
        return event.usage["completion_tokens"]

    async def all_done():
        return await asyncio.gather(*(last(j) for j in jobs))

    try:
        done = events.run_until_complete(all_done())
    finally:
        engine.close()
        events.close()
    assert done == [5 * job.request.n for job in jobs]
    groups = "".join(map(str, log)).split("0")
    assert [len(g) for g in groups[:4]] == [2, 1, 3, 1] and not any(groups[4:])
