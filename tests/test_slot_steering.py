"""Per-slot steering plans and per-token streaming in `generate`, on both backends."""

import importlib.util

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Streaming
from pertoken.errors import PertokenError
from tests.reference import rand, slot_plans
from tests.reference import slot_prompts as _prompts

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, llama_dir):
    return load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")


def _plans():
    """Four slots: response, unsteered, all (two terms), prompt."""
    return slot_plans()[:4]


def test_mixed_batch_gives_each_slot_its_solo_tokens(backend, torch_one_thread):
    ps, plans = _prompts(backend), _plans()
    mixed = backend.generate(ps, max_new_tokens=12, temperature=0, steer=plans, batch_size=4)
    solo = [
        backend.generate([p], max_new_tokens=12, temperature=0, steer=s)[0]
        for p, s in zip(ps, plans)
    ]
    assert mixed == solo
    plain = backend.generate(ps, max_new_tokens=12, temperature=0, batch_size=4)
    assert [m != u for m, u in zip(mixed, plain)] == [True, False, True, True]


def test_one_steer_equals_the_same_steer_per_slot(backend, torch_one_thread):
    ps, st = _prompts(backend), Steer.single(2, rand(5), 4.0, "response")
    one = backend.generate(ps, max_new_tokens=8, temperature=0, steer=st, batch_size=4)
    each = backend.generate(ps, max_new_tokens=8, temperature=0, steer=[st] * 4, batch_size=4)
    assert one == each


def test_stream_reports_tokens_logprobs_and_states(backend, torch_one_thread):
    ps, plans = _prompts(backend), _plans()
    steps = []
    spec = Streaming(steps.append, rows=[1, 4], logprobs=5)
    out = backend.generate(ps, max_new_tokens=10, temperature=0, steer=plans, stream=spec)
    for i, p in enumerate(ps):
        mine = [s for s in steps if s.prompt == i]
        assert [s.index for s in mine] == list(range(len(mine)))
        assert backend.decode([s.token_id for s in mine]) == out[i]
        # each token's state is the one `trace` captures at the token's own position
        tr = backend.trace(p, rows=[1, 4], max_new_tokens=10, steer=plans[i])
        assert [s.token_id for s in mine] == tr.token_ids
        np.testing.assert_allclose(np.stack([s.hidden for s in mine]), tr.hidden, atol=1e-4)
    first = [next(s for s in steps if s.prompt == i and s.index == 0) for i in range(4)]
    lp = backend.next_token_logprobs(ps)
    for i, s in enumerate(first):
        if plans[i] is None:
            want = np.argsort(-lp[i])[:5]
            assert [t for t, _ in s.top] == want.tolist()
            np.testing.assert_allclose([v for _, v in s.top], lp[i][want], atol=1e-4)
        assert s.top[0][0] == s.token_id and s.logprob == pytest.approx(s.top[0][1])


def test_callback_ends_its_slot_only(backend, torch_one_thread):
    ps = _prompts(backend)
    seen = []

    def stop_second_after_three(step):
        seen.append(step)
        return not (step.prompt == 1 and step.index == 2)

    out = backend.generate(
        ps, max_new_tokens=10, temperature=0, stream=Streaming(stop_second_after_three)
    )
    full = backend.generate(ps, max_new_tokens=10, temperature=0)
    assert len([s for s in seen if s.prompt == 1]) == 3
    assert out[1] == backend.decode([s.token_id for s in seen if s.prompt == 1])
    assert [out[i] for i in (0, 2, 3)] == [full[i] for i in (0, 2, 3)]
    assert all(s.hidden is None and s.logprob is None for s in seen)


def test_bad_plans_are_clear_errors(backend):
    ps = _prompts(backend)
    with pytest.raises(PertokenError, match="4 prompts"):
        backend.generate(ps, max_new_tokens=2, steer=[None, None])
    with pytest.raises(PertokenError, match="outside 1..4"):
        backend.generate(ps[:1], max_new_tokens=2, steer=[Steer.single(9, rand(0), 1.0)])
    with pytest.raises(PertokenError, match="outside 0..4"):
        backend.generate(ps[:1], max_new_tokens=2, stream=Streaming(print, rows=[7]))
