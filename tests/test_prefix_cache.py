"""The prompt-prefix cache: a prompt sharing tokens with an earlier one prefills only the
rest, and answers as it would without the cache; steering of prompt positions keys it."""

import importlib.util

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Sampling
from pertoken.backends.generation import Entry
from pertoken.backends.prefix_cache import PrefixCache
from tests.reference import rand
from tests.serve_helpers import client, serving

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])
SYSTEM = "You are a careful assistant who answers in short plain sentences every time."


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model_dir):
    return load_backend(str(model_dir), request.param, dtype="float32", device="cpu")


def _common(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _run(backend, prompts, plans, cache, sampling=Sampling(0)) -> list[Entry]:
    """Each prompt alone through one slot loop, in turn (so later ones can hit the cache)."""
    loop = backend._slots(2, [], 256, prefix=cache)
    out = []
    for i, (p, plan) in enumerate(zip(prompts, plans)):
        draws = None if sampling.greedy else np.random.default_rng(i).random(8)
        e = Entry(backend.encode(p), sampling, 8, lambda e: None, plan=plan, uniforms=draws)
        loop.insert(e)
        while loop.busy:
            loop.step()
        out.append(e)
    return out


@pytest.mark.parametrize("sampling", [Sampling(0), Sampling(1.0, top_p=0.9)])
def test_a_shared_system_prompt_is_prefilled_once(backend, sampling, torch_one_thread):
    ps = [backend.chat_prompt(SYSTEM, q) for q in ("hello there", "what is two and two?")]
    ids = [backend.encode(p) for p in ps]
    shared = _common(*ids)
    assert shared > 10
    plain = _run(backend, ps, [None, None], None, sampling)
    cache = PrefixCache(2**30)
    cached = _run(backend, ps, [None, None], cache, sampling)
    assert [e.answer for e in cached] == [e.answer for e in plain] and cached[1].answer
    assert [e.prefilled for e in cached] == [len(ids[0]), len(ids[1]) - shared]
    assert cache.reused == shared
    again = _run(backend, ps[:1], [None], cache, sampling)[0]  # the same prompt: only its last
    assert again.prefilled == 1 and again.answer == plain[0].answer


def test_prompt_steering_keys_the_cache(backend, torch_one_thread):
    ps = [backend.chat_prompt(SYSTEM, q) for q in ("hello there", "what is two and two?")]
    steer, other = (Steer.single(2, rand(k), 6.0, "all") for k in (0, 1))
    response = Steer.single(2, rand(0), 6.0, "response")
    cache = PrefixCache(2**30)
    first = _run(backend, ps[:1], [steer], cache)[0]
    n = len(backend.encode(ps[1]))
    # response steering acts on the last prompt token only: it reuses the unsteered prefix
    for plan, reused in ((None, False), (other, False), (response, True), (steer, True)):
        e = _run(backend, ps[1:], [plan], cache)[0]
        want = _run(backend, ps[1:], [plan], None)[0]
        assert e.answer == want.answer
        assert (e.prefilled < n) == reused, plan
    assert first.prefilled == len(backend.encode(ps[0]))


def test_prompts_admitted_together_read_their_prefixes_in_one_batch(backend, torch_one_thread):
    """Three prompts sharing the system prompt with an earlier one (by different lengths)
    enter at the same step and are prefilled in one forward from their cached prefixes,
    answering as they do without the cache; a steered row keeps its own steering."""
    qs = ("hello there", "what is two and two?", "hello, what is the time?", "name a colour")
    ps = [backend.chat_prompt(SYSTEM, q) for q in qs]
    ids = [backend.encode(p) for p in ps]
    plans = [None, None, Steer.single(2, rand(0), 6.0, "response"), None]
    cache = PrefixCache(2**30)
    _run(backend, ps[:1], plans[:1], cache)
    loop = backend._slots(4, [], 256, prefix=cache)
    together = [Entry(i, Sampling(0), 8, lambda e: None, plan=p) for i, p in zip(ids, plans)][1:]
    for e in together:
        loop.insert(e)
    while loop.busy:
        loop.step()
    alone = [_run(backend, [p], [plan], None)[0] for p, plan in zip(ps[1:], plans[1:])]
    assert [e.answer for e in together] == [e.answer for e in alone]
    own = [_common(ids[0], i) for i in ids[1:]]
    assert len(set(own)) > 1  # the prefixes differ in length
    # each row reads its own prefix, whatever the others beside it read
    assert [e.prefilled for e in together] == [len(i) - n for i, n in zip(ids[1:], own)]


def test_the_cache_stays_within_its_bytes():
    cache = PrefixCache(100)
    for k in range(5):
        cache.store([k, 1, 2], None, f"kv{k}", 40)
    assert cache.nbytes <= 100 and len(cache.items) == 2  # the least recently used went
    assert cache.lookup([4, 1, 2, 9], None) == (3, "kv4")
    assert cache.lookup([0, 1, 2, 9], None) == (0, None)
    cache.store([7], None, "big", 101)  # larger than the whole cache: not kept
    assert cache.lookup([7, 8], None) == (0, None)


def test_server_second_request_reads_the_shared_prefix_from_the_cache(llama_dir, torch_one_thread):
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    asks = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
            for q in ("hello there", "what is two and two?")]  # fmt: skip
    ids = [bk.encode(bk.chat_messages(m)) for m in asks]
    answers = {}
    for mb in (0, 64):
        with serving(bk, max_tokens=8, prefix_cache_mb=mb) as r:
            c = client(r)
            outs = [
                c.chat.completions.create(
                    model=bk.model_id, messages=m, max_tokens=8, temperature=0
                ) for m in asks
            ]  # fmt: skip
            answers[mb] = [o.choices[0].message.content for o in outs]
            cached = [o.usage.prompt_tokens_details.cached_tokens for o in outs]
            prefilled = r.engine.stats["prefilled_tokens"]
        if mb:
            assert cached == [0, _common(*ids)]
            assert prefilled == len(ids[0]) + len(ids[1]) - _common(*ids)
        else:
            assert cached == [0, 0] and prefilled == len(ids[0]) + len(ids[1])
    assert answers[0] == answers[64]
