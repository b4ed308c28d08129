"""The slot loop (refilled slots) against solo runs, on both backends."""

import copy
import importlib
import importlib.util

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Sampling, Streaming
from pertoken.backends.schedule import prompt_seeds
from pertoken.errors import PertokenError
from tests.reference import rand, stop_ids, stopping_at
from tests.reference import slot_plans as _plans
from tests.reference import slot_prompts as _prompts

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])
NEW = 10


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model_dir):
    return load_backend(str(model_dir), request.param, dtype="float32", device="cpu")


def _solo(backend, prompts, plans, seeds, **opts) -> list[str]:
    return [
        backend.generate([p], steer=[s], seeds=[sd], batch_size=1, **opts)[0]
        for p, s, sd in zip(prompts, plans, seeds)
    ]


@pytest.fixture(scope="module")
def stopper(backend):
    """(backend with one more stop token, j, prompt j's greedy answer ids cut there): the
    token first appears mid-answer, so answers end at different steps and slots refill."""
    for j, p in enumerate(_prompts(backend)):
        ids = backend.trace(p, rows=[1], max_new_tokens=NEW).token_ids
        k = next((k for k in range(1, NEW) if ids[k] not in ids[:k]), None)
        if k is not None:
            return stopping_at(backend, stop_ids(backend) | {ids[k]}), j, ids[:k]
    raise AssertionError("no greedy answer has a new token after its first")


@pytest.mark.parametrize(
    "opts",
    [
        dict(temperature=0),
        dict(temperature=1.0),
        dict(temperature=1.0, top_p=0.9, repetition_penalty=1.3),
    ],
)
def test_each_prompt_gets_its_solo_answer(stopper, opts, torch_one_thread):
    backend, j, cut = stopper
    ps, plans, seeds = _prompts(backend) + [_prompts(backend)[2]], _plans(), [5, 6, 7, 8, 9]
    got = backend.generate(ps, steer=plans, seeds=seeds, batch_size=2, max_new_tokens=NEW, **opts)
    assert got == _solo(backend, ps, plans, seeds, max_new_tokens=NEW, **opts)
    lengths = {len(backend.encode(a)) for a in got}
    assert len(lengths) > 1  # slots ended at different steps
    if opts["temperature"] == 0:
        plain = backend.generate(ps, max_new_tokens=NEW, temperature=0, batch_size=2)
        assert plain[j] == backend.decode(cut)  # ended by the stop token, others go on


def test_batch_size_one_and_max_new_tokens(backend, torch_one_thread):
    ps, plans = _prompts(backend), _plans()[:4]
    opts = dict(steer=plans, max_new_tokens=NEW, temperature=1.0, seed=11)
    one, three = (backend.generate(ps, batch_size=n, **opts) for n in (1, 3))
    assert one == three
    greedy = backend.generate(ps, max_new_tokens=NEW, temperature=0, batch_size=2)
    for p, a in zip(ps, greedy):  # nothing stops these answers: each runs to the cap
        ids = backend.trace(p, rows=[1], max_new_tokens=NEW).token_ids
        assert len(ids) == NEW and a == backend.decode(ids)
    single = backend.generate(ps, max_new_tokens=1, temperature=0, batch_size=2)
    for p, a in zip(ps, single):
        assert a == backend.decode(backend.trace(p, rows=[1], max_new_tokens=1).token_ids)


def test_seed_alone_gives_each_prompt_its_own_seed(backend, torch_one_thread):
    ps, opts = _prompts(backend), dict(max_new_tokens=NEW, temperature=1.0)
    got = backend.generate(ps, seed=3, batch_size=2, **opts)
    assert got == _solo(backend, ps, [None] * 4, prompt_seeds(3, 4), **opts)
    assert got == backend.generate(ps, sampling=Sampling(1.0, seed=3), batch_size=4, **opts)
    assert backend.generate(ps, seed=4, batch_size=2, **opts) != got


def test_samples_of_one_prompt_share_one_prefill(backend, monkeypatch, torch_one_thread):
    """...and prompts entering free slots together are prefilled in one batch."""
    slots = importlib.import_module(f"pertoken.backends.{backend.name}.continuous").Slots
    prefill, calls, batches = slots._prefill, [], []

    def counted(self, entries):
        calls.extend(e.prompt for e in entries)
        batches.append(len(entries))
        return prefill(self, entries)

    monkeypatch.setattr(slots, "_prefill", counted)
    p, q = _prompts(backend)[:2]
    st = Steer.single(2, rand(0), 6.0, "response")
    ps, seeds = [p, q, p, q, p, p], [1, 2, 3, 4, 5, 6]
    opts = dict(max_new_tokens=NEW, temperature=1.0, batch_size=3, seeds=seeds)
    shared = backend.generate(ps, steer=st, **opts)
    assert len(calls) == 2  # one per distinct prompt
    calls.clear(), batches.clear()
    apart = backend.generate(ps, steer=[copy.deepcopy(st) for _ in ps], **opts)
    assert sorted(calls) == list(range(len(ps)))  # distinct plan objects: each prefilled
    assert batches[0] == 3  # the three first slots are filled by one prefill
    assert shared == apart
    assert len(set(shared[i] for i in (0, 2, 4, 5))) > 1  # the samples differ


def test_bad_batch_size_and_seeds(backend):
    ps = _prompts(backend)[:1]
    with pytest.raises(PertokenError, match="batch size must be at least 1"):
        backend.generate(ps, max_new_tokens=2, batch_size=-1)
    with pytest.raises(PertokenError, match="seeds for 1 prompts"):
        backend.generate(ps, max_new_tokens=2, seeds=[1, 2])
    np.testing.assert_equal(prompt_seeds(0, 3)[:2], prompt_seeds(0, 2))


def test_each_answer_is_handed_over_as_it_ends(stopper, torch_one_thread):
    backend, j, _ = stopper
    ps, ended = _prompts(backend), []
    got = backend.generate(
        ps, max_new_tokens=NEW, temperature=0, batch_size=2,
        on_answer=lambda i, text: ended.append((i, text)),
    )  # fmt: skip
    assert sorted(ended) == list(enumerate(got))  # each prompt once, with its returned text
    assert [i for i, _ in ended].index(j) < len(ps) - 1  # the one cut by the stop token first


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_streamed_tokens_and_captures_equal_solo_runs(stopper, temperature, torch_one_thread):
    """Each prompt's streamed steps (token, logprobs, hidden states at its own position) in
    refilled slots equal its solo stream's, steered per slot."""
    backend, _, _ = stopper
    ps, plans, seeds = _prompts(backend), _plans()[:4], [5, 6, 7, 8]

    def streamed(prompts, steer, sd, batch_size):
        got: dict[int, list] = {}

        def on_step(s):
            got.setdefault(s.prompt, []).append((s.index, s.token_id, s.logprob, s.top, s.hidden))

        spec = Streaming(on_step, rows=[0, 2], logprobs=3)
        texts = backend.generate(prompts, steer=steer, seeds=sd, stream=spec, max_new_tokens=NEW,
                                 temperature=temperature, batch_size=batch_size)  # fmt: skip
        return texts, [got.get(i, []) for i in range(len(prompts))]

    texts, steps = streamed(ps, plans, seeds, 2)
    for i in range(len(ps)):
        (text,), (solo,) = streamed([ps[i]], [plans[i]], [seeds[i]], 1)
        assert texts[i] == text and backend.decode([t for _, t, *_ in steps[i]]) == text
        assert [s[:2] for s in steps[i]] == [s[:2] for s in solo]
        for (_, _, lp, top, h), (_, _, lp1, top1, h1) in zip(steps[i], solo, strict=True):
            np.testing.assert_allclose(lp, lp1, atol=1e-4)
            assert [t for t, _ in top] == [t for t, _ in top1] and len(top) == 3
            np.testing.assert_allclose(h, h1, atol=1e-4)
            assert h.shape == (2, backend.hidden_size)


def _slots_taken(backend, monkeypatch) -> list[int]:
    """The slot counts `generate` gives its continuous batches, recorded as they start."""
    taken, make = [], type(backend)._slots

    def record(self, batch, *rest):
        taken.append(batch)
        return make(self, batch, *rest)

    monkeypatch.setattr(type(backend), "_slots", record)
    return taken


@pytest.mark.parametrize("slots", [1, 5])
def test_the_slots_memory_allows(backend, monkeypatch, slots, torch_one_thread):
    """On an accelerator, as many slots as have their full-length KV cache fit in what is free:
    70% of CUDA's free memory, or 90% of Metal's working set less what MLX already holds."""
    from pertoken.backends.memory import kv_bytes_per_token

    ps, new = _prompts(backend)[:1], 3
    longest = len(backend.encode(ps[0])) + new
    config = backend.config if backend.name == "mlx" else backend.model.config.to_dict()
    per_slot = kv_bytes_per_token(config, "float32") * longest
    if backend.name == "torch":
        import torch

        monkeypatch.setattr(backend, "device", "cuda:0")
        free = int((slots + 0.5) * per_slot / 0.7)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free, 2 * free))
    else:
        import mlx.core as mx

        from pertoken.backends import machine

        held = 10**6
        budget = int(((slots + 0.5) * per_slot + held) / 0.9)
        monkeypatch.setattr(mx.metal, "is_available", lambda: True)
        monkeypatch.setattr(mx, "get_active_memory", lambda: held)
        monkeypatch.setattr(machine, "mlx_budget", lambda: (budget, "Metal"))
    assert backend._auto_batch(longest) == slots


def test_without_batch_size_generate_takes_the_slots_memory_allows(backend, monkeypatch):
    taken = _slots_taken(backend, monkeypatch)
    monkeypatch.setattr(backend, "_auto_batch", lambda longest: 3)
    backend.generate(_prompts(backend), max_new_tokens=2, temperature=0)
    assert taken == [3]
    backend.generate(_prompts(backend), max_new_tokens=2, temperature=0, batch_size=2)
    assert taken == [3, 2]


def test_waiting_entries_share_prefills_by_key():
    from types import SimpleNamespace

    from pertoken.backends.schedule import Waiting

    def entry(key, cancelled=False):
        return SimpleNamespace(key=key, cancelled=cancelled, on_end=ended.append)

    q, runs, ended = Waiting(), [], []
    es = [entry(k) for k in "abacba"]
    for e in es:
        q.add(e)

    def prefill(entries):
        runs.append([es.index(e) for e in entries])
        return [f"pre{es.index(e)}" for e in entries]

    # entries of one key still waiting share the first one's prefill
    assert q.take(2, prefill) == [(es[0], "pre0"), (es[1], "pre1")]
    assert q.take(3, prefill) == [(es[2], "pre0"), (es[3], "pre3"), (es[4], "pre1")]
    assert q.take(5, prefill) == [(es[5], "pre0")] and not q
    assert runs == [[0, 1], [3]] and q.prefills == 3 and not q.held  # nothing kept after
    gone = entry("z", cancelled=True)
    q.add(gone)
    assert q.take(1, prefill) == [] and ended == [gone]  # a cancelled entry ends unprefilled


def test_a_loop_started_short_grows_to_fit_and_answers_alike(backend, torch_one_thread):
    """A long-lived loop (the server's) starts with a short cache and grows it as entries
    need, carrying over the slots already decoding."""
    from pertoken.backends.generation import Entry

    ps, plans, caps = _prompts(backend), _plans()[:4], [2, 30, 60, 60]
    want = [
        backend.generate([p], steer=[s], max_new_tokens=n, temperature=0)[0]
        for p, s, n in zip(ps, plans, caps)
    ]
    loop = backend._slots(2, [], 4)
    ended = []
    for p, plan, n in zip(ps, plans, caps):  # the third enters while the second decodes
        loop.insert(Entry(backend.encode(p), Sampling(0), n, ended.append, plan=plan))
    while loop.busy:
        loop.step()
    got = {id(e.plan): backend.decode(e.answer) for e in ended}
    assert [got[id(plan)] for plan in plans] == want
    assert len(backend.encode(want[2])) > 30  # it ran past what the first cache held


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_torch_step_runs_over_the_busy_slots_moved_to_the_front(
    model_dir, temperature, torch_one_thread
):
    """Eight slots, six of whose answers end after two tokens: the loop's steps narrow to two
    slots, its two steered answers moved from the back (keys, positions, steering, draws and
    a token waiting for its captured state); each one's streamed tokens, logprobs and states
    still equal its solo run's."""
    from pertoken.backends.base import slot_uniforms
    from pertoken.backends.generation import Entry

    backend = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    ps, plans = _prompts(backend) * 2, [None] * 6 + _plans()[2:4]
    caps, sampling = [2] * 6 + [20, 20], Sampling(temperature)

    def run(which: list[int], slots: int):
        loop, got, widths = backend._slots(slots, [0, 2], 64), {}, []
        for i in which:
            draws = None if sampling.greedy else slot_uniforms([i], caps[i])[0]
            loop.insert(Entry(
                backend.encode(ps[i]), sampling, caps[i], lambda e: None, plan=plans[i],
                uniforms=draws, prompt=i, hidden=True, logprobs=2,
                on_step=lambda s: got.setdefault(s.prompt, []).append(s),
            ))  # fmt: skip
        while loop.busy:
            loop.step()
            widths.append(loop.slots.width)
        return got, widths

    together, widths = run(list(range(8)), 8)
    assert widths[0] == 8 and 2 in widths and widths == sorted(widths, reverse=True)
    for i in range(8):
        solo = run([i], 1)[0][i]
        assert [s.token_id for s in together[i]] == [s.token_id for s in solo]
        for a, b in zip(together[i], solo, strict=True):
            np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
            np.testing.assert_allclose(a.logprob, b.logprob, atol=1e-4)


def test_a_first_token_is_handed_on_before_the_decode_step(backend, torch_one_thread):
    """The step that admits a prompt flushes its first token (drawn from the prefill) before
    it decodes the second, and flushes that after."""
    from pertoken.backends.generation import Entry

    out = stopping_at(backend, {-1})  # no token ends an answer
    seen, flushes = [], []
    loop = out._slots(2, [], 32, lambda: flushes.append(len(seen)))
    p = out.encode(_prompts(backend)[0])
    loop.insert(Entry(p, Sampling(0), 5, lambda e: None, on_step=seen.append))
    loop.step()
    assert flushes == [1, 2]


def test_a_torch_step_that_neither_steers_nor_captures_runs_without_hooks(
    model_dir, monkeypatch, torch_one_thread
):
    """The residual hooks go on only for steps that may steer or capture; answers are the
    same either way."""
    from pertoken.backends.generation import Entry
    from pertoken.backends.torch import backend as module

    bk = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    taps, real = [], module.residual_taps
    monkeypatch.setattr(module, "residual_taps", lambda *a: taps.append(1) or real(*a))
    p, plan = bk.encode(_prompts(bk)[0]), _plans()[0]
    want = [bk.generate([_prompts(bk)[0]], steer=[s], max_new_tokens=4, temperature=0)[0]
            for s in (None, plan)]  # fmt: skip
    got = []
    for steer in (None, plan):
        loop = bk._slots(2, [], 32)
        loop.insert(Entry(p, Sampling(0), 4, got.append, plan=steer))
        taps.clear()
        while loop.busy:
            loop.step()
        assert bool(taps) == (steer is not None)
    assert [bk.decode(e.answer) for e in got] == want
