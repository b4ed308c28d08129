"""Chunked prefill on the MLX backend equals one pass over the whole input."""

import copy

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'pertoken[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'pertoken[mlx]')")

import mlx.core as mx  # noqa: E402

from pertoken.backends import Steer, load_backend  # noqa: E402
from pertoken.backends.mlx.batch import full_pass, ids_of, window_of  # noqa: E402
from pertoken.backends.mlx.prefill import prefill  # noqa: E402
from pertoken.backends.plan import left_pad  # noqa: E402
from tests.reference import ANSWERS, chat_prompts  # noqa: E402

pytestmark = pytest.mark.mlx
WHOLE = 10**6  # one chunk, whatever the length


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend(str(model_dir), "mlx", dtype="float32", device="cpu")


def chunked(backend, chunk: int):
    out = copy.copy(backend)
    out.prefill_chunk = chunk
    return out


def steer_of(backend, positions="response") -> Steer:
    vec = np.random.default_rng(0).standard_normal(backend.hidden_size).astype(np.float32)
    return Steer.single(2, vec, 4.0, positions=positions)


def one_pass_logits(backend, ids: list[int]) -> np.ndarray:
    """[T, vocab] through a single forward with a full [T, T] mask (no cache, no chunks)."""
    batch = left_pad([ids], 0)
    out = backend.model(ids_of(batch), None, full_pass(batch, window_of(backend.model)))
    return np.array(out[0].astype(mx.float32))


@pytest.mark.parametrize("chunk", [5, 16])
def test_logits_equal_one_pass(backend, chunk):
    # Gemma 2's window is 8: chunks of 5 sit inside it, chunks of 16 span it
    parts, whole = chunked(backend, chunk), chunked(backend, WHOLE)
    for p, a in zip(chat_prompts(backend), ANSWERS):
        ids = backend.encode(p + a)
        assert len(ids) > chunk
        got = parts.logits(p + a)
        np.testing.assert_allclose(got, one_pass_logits(backend, ids), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got, whole.logits(p + a), rtol=1e-4, atol=1e-4)
        plen = len(backend.encode(p))
        steered = parts.logits(p + a, steer=steer_of(backend), prompt_len=plen)
        np.testing.assert_allclose(
            steered, whole.logits(p + a, steer=steer_of(backend), prompt_len=plen), atol=1e-4
        )
        assert not np.allclose(steered, got, atol=1e-3)


def test_summaries_equal_one_pass(backend):
    ps = chat_prompts(backend)
    got = chunked(backend, 5).summaries(ps, ANSWERS, batch_size=3)  # padded slots
    want = chunked(backend, WHOLE).summaries(ps, ANSWERS, batch_size=3)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_generation_and_logprobs_equal_one_pass(backend):
    ps = chat_prompts(backend)
    parts, whole = chunked(backend, 5), chunked(backend, WHOLE)
    np.testing.assert_allclose(
        parts.next_token_logprobs(ps, batch_size=3),
        whole.next_token_logprobs(ps, batch_size=3),
        atol=1e-4,
    )
    for steer in (None, steer_of(backend, "all")):
        kw = dict(max_new_tokens=8, temperature=0, batch_size=3, steer=steer)
        assert parts.generate(ps, **kw) == whole.generate(ps, **kw)
    t_parts = parts.trace(ps[1], rows=[1, 4], max_new_tokens=6)
    t_whole = whole.trace(ps[1], rows=[1, 4], max_new_tokens=6)
    assert t_parts.token_ids == t_whole.token_ids
    np.testing.assert_allclose(t_parts.hidden, t_whole.hidden, atol=1e-4)


def test_an_unpadded_input_builds_no_mask(backend, monkeypatch):
    import pertoken.backends.mlx.prefill as module

    built = []
    real = module.attend_mask
    monkeypatch.setattr(module, "attend_mask", lambda *a: built.append(a[2:]) or real(*a))
    ids = backend.encode(chat_prompts(backend)[0])
    prefill(backend.model, left_pad([ids], 0), chunk=5, head="last")
    window = window_of(backend.model)
    # only sliding-window layers (Gemma 2) need a mask, and only [chunk, S] of it
    assert built == ([(window,)] * -(-len(ids) // 5) if window else [])
