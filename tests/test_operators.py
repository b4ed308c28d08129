"""Steering operators (add, ablate, cap, when) on both backends and the compiled step."""

import importlib.util

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Condition, SteerTerm, Streaming
from pertoken.backends.conditions import decide
from pertoken.backends.torch import TorchBackend
from pertoken.errors import PertokenError
from tests.reference import chat_prompts, rand

BACKENDS = ["torch", "compiled"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])
ROW = 2
NEW = 8


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, llama_dir):
    if request.param == "compiled":
        return TorchBackend.load(str(llama_dir), dtype="float32", device="cpu", compile=True)
    return load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")


@pytest.fixture(scope="module", params=[b for b in BACKENDS if b != "compiled"])
def eager(request, llama_dir):
    """The backends whose decode loops the compiled step does not replace (conditions are
    decided before any loop, and the compiled step has its own batch test below)."""
    return load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")


def _unit(v):
    return v / np.linalg.norm(v)


def _teacher(backend, steer, rows=(ROW,)):
    """Per sequence [T, rows, 2]: projection on rand(0) and |h|, answer after the prompt."""
    prompts = chat_prompts(backend)
    ids = [backend.encode(p) + backend.encode("Sure, here it is.") for p in prompts]
    lens = [len(backend.encode(p)) for p in prompts]
    u = np.stack([_unit(rand(0))] * len(rows))[None]  # [1, R, hidden]
    got = backend.token_projections(ids, u, list(rows), steer=steer, prompt_lens=lens)
    return got, lens


def test_ablate_zeroes_the_projection_where_it_steers_and_nothing_else(backend):
    before, lens = _teacher(backend, None)
    after, _ = _teacher(backend, Steer.ablate(ROW, rand(0) * 3, positions="response"))
    for b, a, n in zip(before, after, lens):
        assert np.abs(a[n - 1 :, 0, 0]).max() < 1e-4  # the last prompt token and the answer
        assert np.array_equal(a[: n - 1], b[: n - 1])  # the prompt, bit for bit
        assert np.abs(b[n - 1 :, 0, 0]).max() > 0.1  # there was something to remove


def test_mean_ablation_sets_the_stored_mean(backend):
    after, lens = _teacher(backend, Steer.ablate(ROW, rand(0), mean=1.5, positions="all"))
    for a in after:
        np.testing.assert_allclose(a[:, 0, 0], 1.5, atol=1e-4)


def test_cap_keeps_tokens_in_range_bit_for_bit_and_clamps_the_rest(backend):
    before, _ = _teacher(backend, None)
    p = np.concatenate([b[:, 0, 0] for b in before])
    lo, hi = np.quantile(p, 0.2), np.quantile(p, 0.7)
    after, _ = _teacher(backend, Steer.cap(ROW, rand(0), lo=lo, hi=hi))
    for b, a in zip(before, after):
        inside = (b[:, 0, 0] >= lo) & (b[:, 0, 0] <= hi)
        assert np.array_equal(a[inside], b[inside])
        want = np.clip(b[~inside, 0, 0], lo, hi)
        np.testing.assert_allclose(a[~inside, 0, 0], want, atol=1e-4)
    assert (p > hi).any() and (p < lo).any()


def test_add_through_the_new_api_is_todays_add(backend):
    old, _ = _teacher(backend, Steer.single(ROW, rand(1), 3.0))
    new, _ = _teacher(backend, Steer.add(ROW, rand(1), 3.0))
    for a, b in zip(old, new):
        assert np.array_equal(a, b)


def _mixed(backend):
    """Plans mixing operators per slot: add, ablate, cap then add, None, mean-ablate + add."""
    v, w = rand(0), rand(1)
    cap_add = Steer.cap(ROW, v, hi=0.5, positions="response").then(
        Steer.add(1, w, 4.0, positions="response")
    )
    two = Steer.ablate(ROW, v, mean=-1.0, positions="all").then(Steer.add(ROW, w, 5.0))
    return [
        Steer.add(ROW, w, 6.0, positions="response"),
        Steer.ablate(1, w, positions="all"),
        cap_add,
        None,
        two,
    ]


def test_batch_of_mixed_operators_equals_each_prompt_alone(eager):
    prompts = chat_prompts(eager) + [eager.chat_prompt(None, "more"), "hi there"]
    plans = _mixed(eager)
    kw = dict(max_new_tokens=NEW, temperature=0)
    alone = [eager.generate([p], steer=[s], **kw)[0] for p, s in zip(prompts, plans)]
    for batch_size in (2, 5):  # slots refilled as answers end, and all at once
        got = eager.generate(prompts, steer=plans, batch_size=batch_size, **kw)
        assert got == alone, batch_size
    assert len(set(alone)) > 1


def test_ablate_while_generating_leaves_no_projection(backend):
    seen = []
    stream = Streaming(lambda s: seen.append(s.hidden[0]), rows=[ROW])
    steer = Steer.ablate(ROW, rand(0) * 2, positions="response")
    backend.generate(chat_prompts(backend), max_new_tokens=NEW, temperature=0, steer=steer,
                     stream=stream, batch_size=3)  # fmt: skip
    assert len(seen) > 3
    assert max(abs(float(h @ _unit(rand(0)))) for h in seen) < 1e-4


def _condition(backend, prompts):
    """A condition on rand(5) at row 1 whose threshold sits between the prompts' means."""
    unit = _unit(rand(5))[None, None]
    got = backend.token_projections([backend.encode(p) for p in prompts], unit, [1])
    means = [float(g[:, 0, 0].mean()) for g in got]
    return Condition(1, rand(5), float(np.mean(means))), means


def test_when_fires_above_the_threshold_and_not_below(eager):
    prompts = chat_prompts(eager)[:2]
    cond, means = _condition(eager, prompts)
    assert means[0] != means[1]
    kw = dict(max_new_tokens=NEW, temperature=0)
    steer = Steer.add(ROW, rand(1), 8.0, positions="response", when=cond)
    always = eager.generate(prompts, steer=Steer.add(ROW, rand(1), 8.0, positions="response"), **kw)
    never = eager.generate(prompts, **kw)
    got = eager.generate(prompts, steer=steer, **kw)
    above = [m > cond.threshold for m in means]
    assert got == [a if up else n for a, n, up in zip(always, never, above)]
    assert always != never
    decided = decide(eager, [eager.encode(p) for p in prompts], [steer, steer])
    assert [d.decisions[0]["fired"] for d in decided] == above
    assert [len(d.terms) for d in decided] == [int(a) for a in above]
    np.testing.assert_allclose([d.decisions[0]["projection"] for d in decided], means, atol=1e-4)
    below = Condition(1, rand(5), cond.threshold, above=False)
    flipped = decide(
        eager,
        [eager.encode(p) for p in prompts],
        [Steer.add(ROW, rand(1), 1.0, when=below)] * 2,
    )
    assert [d.decisions[0]["fired"] for d in flipped] == [not a for a in above]


def test_a_trace_records_whether_its_condition_fired(eager):
    prompts = chat_prompts(eager)[:2]
    cond, means = _condition(eager, prompts)
    steer = Steer.cap(ROW, rand(1), hi=0.0, positions="response", when=cond)
    for p, m in zip(prompts, means):
        tr = eager.trace(p, max_new_tokens=3, rows=[ROW], steer=steer)
        assert tr.meta["conditions"][0]["fired"] == (m > cond.threshold)


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(op="scale"), "unknown steering op"),
        (dict(op="cap", lo=2.0, hi=1.0), "below lo"),
        (dict(op="cap"), "needs a lower bound"),
        (dict(op="cap", hi=float("nan")), "finite"),
        (dict(op="ablate", mean=float("inf")), "finite"),
    ],
)
def test_bad_terms_are_one_line(kw, words):
    with pytest.raises(PertokenError, match=words):
        SteerTerm(2, rand(0), **kw)


def test_a_coefficient_that_overflows_the_dtype_is_refused(llama_dir):
    bk = TorchBackend.load(str(llama_dir), dtype="float32", device="cpu")
    steer = Steer.add(ROW, rand(0), 1e39)  # finite as a Python float, inf in float32
    with pytest.raises(PertokenError, match="overflows float32.*report card"):
        bk.generate(["hi"], max_new_tokens=2, steer=steer)
    with pytest.raises(PertokenError, match="overflows float16"):
        Steer.add(ROW, rand(0), 1e5).validate(bk.n_layers, bk.hidden_size, "float16")
    with pytest.raises(PertokenError, match="beyond float16's range.*report card"):
        Steer.add(ROW, rand(0), 1e5).validate(bk.n_layers, bk.hidden_size, "float32")
    with pytest.raises(PertokenError, match="beyond any activation"):
        Steer.cap(ROW, rand(0), hi=1e39).validate(bk.n_layers, bk.hidden_size, "float32")
    Steer.add(ROW, rand(0), 100.0).validate(bk.n_layers, bk.hidden_size, "float16")


def test_a_trace_under_ablation_holds_no_projection(backend):
    # on the compiled backend, trace decodes through the compiled step's buffers
    steer = Steer.ablate(ROW, rand(0) * 2, positions="response")
    tr = backend.trace(chat_prompts(backend)[0], max_new_tokens=NEW, rows=[ROW], steer=steer)
    assert len(tr.hidden) > 2
    assert np.abs(tr.hidden[:, 0] @ _unit(rand(0))).max() < 1e-4


def test_the_compiled_step_applies_mixed_operators_as_the_eager_loop(llama_dir):
    load = dict(dtype="float32", device="cpu")
    eager = TorchBackend.load(str(llama_dir), **load)
    compiled = TorchBackend.load(str(llama_dir), compile=True, **load)
    v, w = rand(0), rand(1)
    plans = [
        Steer.add(ROW, w, 6.0, positions="response"),
        Steer.ablate(1, w, positions="response"),
        Steer.cap(ROW, v, hi=0.5, positions="response").then(
            Steer.add(1, w, 4.0, positions="response")
        ),
        None,
        Steer.ablate(ROW, v, mean=-1.0, positions="response").then(
            Steer.add(ROW, w, 5.0, positions="response")
        ),
    ]
    prompts = chat_prompts(eager) + [eager.chat_prompt(None, "more"), "hi there"]
    kw = dict(max_new_tokens=NEW, temperature=0)
    want = eager.generate(prompts, steer=plans, batch_size=5, **kw)
    assert compiled.generate(prompts, steer=plans, batch_size=5, **kw) == want
    assert compiled.compiled._step.shape.ops == ((1, 1), (ROW, 2))
    alone = [compiled.generate([p], steer=[s], **kw)[0] for p, s in zip(prompts, plans)]
    assert alone == want and len(set(want)) > 1


def test_operators_that_enter_a_running_loop_leave_its_other_slots_alone(backend):
    """A slot loop decoding an added vector takes a request that ablates and caps midway
    (its buffers grow operator stages): each answer is still its solo run's."""
    from pertoken.backends.base import Sampling
    from pertoken.backends.generation import Entry

    first, later = chat_prompts(backend)[:2]
    plans = [
        Steer.add(ROW, rand(1), 6.0, positions="response"),
        Steer.ablate(1, rand(1), positions="all").then(Steer.cap(ROW, rand(0), hi=0.5)),
    ]
    kw = dict(max_new_tokens=NEW, temperature=0)
    alone = [backend.generate([p], steer=[s], **kw)[0] for p, s in zip((first, later), plans)]
    done = {}
    loop = backend._slots(2, [], 64)
    for i, (p, s) in enumerate(zip((first, later), plans)):
        on_end = lambda e: done.__setitem__(e.prompt, backend.decode(e.answer))  # noqa: E731
        entry = Entry(backend.encode(p), Sampling(0.0), NEW, on_end, plan=s, prompt=i)
        loop.insert(entry)
        for _ in range(3 if i == 0 else 0):
            loop.step()  # the first answer is decoding when the second arrives
        assert i == 1 or not done
    while loop.busy:
        loop.step()
    assert [done[0], done[1]] == alone and alone[0] != alone[1]
