"""Backend.token_projections: batched teacher-forced projections reduced on the device.

Checked per token (prompt and answer) against transformers' output_hidden_states, between
batch sizes, and between the torch and MLX backends, on the tiny Llama and Gemma 2."""

import functools

import numpy as np
import pytest

from pertoken.backends import Steer, is_installed, load_backend
from pertoken.errors import PertokenError
from tests.reference import ANSWERS, chat_prompts, hf_hidden

BACKENDS = [
    "torch",
    pytest.param("mlx", marks=pytest.mark.skipif(not is_installed("mlx"), reason="needs mlx")),
]
ROWS = [0, 2, 4]


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request, model_dir):
    return load_backend(str(model_dir), request.param, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()


def _directions(n_vectors=2, rows=ROWS, hidden=64, seed=0):
    d = np.random.default_rng(seed).normal(size=(n_vectors, len(rows), hidden))
    return (d / np.linalg.norm(d, axis=-1, keepdims=True)).astype(np.float32)


def _texts(backend):
    # three lengths, so batches are padded; the long one passes Gemma 2's window of 8
    return [p + a for p, a in zip(chat_prompts(backend), ANSWERS, strict=True)]


def test_every_token_matches_output_hidden_states(backend, hf_model):
    d = _directions()
    ids = [backend.encode(t) for t in _texts(backend)]
    got = backend.token_projections(ids, d, ROWS, batch_size=2)
    for seq, g in zip(ids, got, strict=True):
        hs = hf_hidden(hf_model, seq)[ROWS]  # [R, T, hidden]
        assert g.shape == (len(seq), len(ROWS), 3) and g.dtype == np.float32
        want = np.einsum("rth,vrh->trv", hs, d)  # h . v / |v| with |v| = 1
        np.testing.assert_allclose(g[..., :2], want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g[..., 2], np.linalg.norm(hs, axis=-1).T, rtol=1e-4)


def test_batch_one_equals_batch_n(backend):
    d = _directions(rows=[1, 3], seed=1)
    ids = [backend.encode(t) for t in _texts(backend)]
    many = backend.token_projections(ids, d, [1, 3], batch_size=3)
    for seq, m in zip(ids, many, strict=True):
        (one,) = backend.token_projections([seq], d, [1, 3], batch_size=1)
        np.testing.assert_allclose(m, one, rtol=1e-4, atol=1e-5)


def test_steering_changes_rows_at_and_after_its_layer(backend):
    d = _directions(rows=[1, 2, 3], seed=2)
    text = _texts(backend)[1]
    ids = [backend.encode(text)]
    vec = np.random.default_rng(3).normal(size=64).astype(np.float32)
    (plain,) = backend.token_projections(ids, d, [1, 2, 3])
    (steered,) = backend.token_projections(ids, d, [1, 2, 3], steer=Steer.single(2, vec, 4.0))
    np.testing.assert_allclose(steered[:, 0], plain[:, 0], rtol=1e-5, atol=1e-5)
    assert np.abs(steered[:, 1:] - plain[:, 1:]).min() > 1e-3
    # response steering leaves every position before the last prompt token as it was
    P = 10
    resp = Steer.single(2, vec, 4.0, positions="response")
    (part,) = backend.token_projections(ids, d, [1, 2, 3], steer=resp, prompt_lens=[P])
    np.testing.assert_allclose(part[: P - 1], plain[: P - 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(part[P - 1 :, 1], steered[P - 1 :, 1], rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_clear_errors(backend):
    ids = [backend.encode("hello")]
    with pytest.raises(PertokenError, match="no layers"):
        backend.token_projections(ids, _directions(rows=[]), [])
    with pytest.raises(PertokenError, match="outside 0..4"):
        backend.token_projections(ids, _directions(rows=[9]), [9])
    with pytest.raises(PertokenError, match="same model"):
        backend.token_projections(ids, _directions(hidden=32), ROWS)
    with pytest.raises(PertokenError, match="at least one token"):
        backend.token_projections([[]], _directions(), ROWS)


def test_offsets_cover_the_text(backend):
    text = _texts(backend)[0] + " é <scratchpad>x</scratchpad>"
    ids, spans = backend.encode_offsets(text)
    assert ids == backend.encode(text) and len(spans) == len(ids)
    assert all(0 <= s <= e <= len(text) for s, e in spans)
    assert [s for s, _ in spans] == sorted(s for s, _ in spans)


@pytest.mark.skipif(not is_installed("mlx"), reason="parity needs mlx")
def test_torch_and_mlx_agree(model_dir):
    t = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    m = load_backend(str(model_dir), "mlx", dtype="float32", device="cpu")
    messages = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Sure. <think>hmm</think> done"},
    ]
    assert t.chat_text(messages) == m.chat_text(messages)
    texts = _texts(t)
    ids = [t.encode(x) for x in texts]
    assert [t.encode_offsets(x) for x in texts] == [m.encode_offsets(x) for x in texts]
    d, steer = _directions(rows=[0, 1, 4], seed=4), Steer.single(1, _directions()[0, 0], 3.0)
    for kw in ({}, {"steer": steer, "prompt_lens": [5, 6, 7]}):
        a = t.token_projections(ids, d, [0, 1, 4], batch_size=2, **kw)
        b = m.token_projections(ids, d, [0, 1, 4], batch_size=2, **kw)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-4)


def _set_chunk(backend, monkeypatch, n: int) -> None:
    if backend.name == "torch":
        from pertoken.backends.torch import trace_batch

        monkeypatch.setattr(trace_batch, "CHUNK", n)
    else:
        monkeypatch.setattr(backend, "prefill_chunk", n)


def _spy_lengths(backend, monkeypatch) -> list[int]:
    """Input tokens per forward of the decoder (torch) or the model (MLX)."""
    lengths: list[int] = []
    if backend.name == "torch":
        decoder = backend.model.get_decoder()
        forward = decoder.forward

        @functools.wraps(forward)  # the signature says which cache keyword it takes
        def spy(*a, **kw):
            lengths.append(kw["input_ids"].shape[1])
            return forward(*a, **kw)

        monkeypatch.setattr(decoder, "forward", spy)
    else:
        model = backend.model

        class Spy:
            def __getattr__(self, name):
                return getattr(model, name)

            def __call__(self, ids, *rest):
                lengths.append(ids.shape[1])
                return model(ids, *rest)

        monkeypatch.setattr(backend, "model", Spy())
    return lengths


def test_long_sequences_are_traced_in_chunks_with_the_same_values(backend, monkeypatch):
    """A sequence longer than the chunk goes through the model a chunk at a time (attention
    holds [chunk, T], not [T, T]), padded and steered alike, with the values of one forward."""
    d = _directions(rows=[1, 4], seed=2)
    words = " ".join(ANSWERS).split()
    text = " ".join(words[i % len(words)] for i in range(260))
    ids = [backend.encode(text), backend.encode(text[: len(text) // 2])]
    vec = np.random.default_rng(3).normal(size=64).astype(np.float32)
    steer = Steer.single(2, vec / np.linalg.norm(vec), 4.0, "response")
    kw = dict(steer=steer, prompt_lens=[40, 25], batch_size=2)
    _set_chunk(backend, monkeypatch, 4096)
    whole = backend.token_projections(ids, d, [1, 4], **kw)
    _set_chunk(backend, monkeypatch, 64)
    lengths = _spy_lengths(backend, monkeypatch)
    chunked = backend.token_projections(ids, d, [1, 4], **kw)
    assert len(ids[0]) > 200 and max(lengths) == 64 and sum(lengths) == len(ids[0])
    for w, c in zip(whole, chunked, strict=True):
        assert w.shape == c.shape
        np.testing.assert_allclose(c, w, rtol=1e-4, atol=1e-4)
    unsteered = backend.token_projections(ids, d, [1, 4], prompt_lens=[40, 25], batch_size=2)
    assert np.abs(unsteered[0][60:, 1, :2] - chunked[0][60:, 1, :2]).max() > 1e-2
