"""The numpy batch plan against the code both backends run today, on the tiny models' tokenizers."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import steer_mask
from pertoken.backends.chat import token_pieces as chat_token_pieces
from pertoken.backends.plan import (
    TokenPieces,
    encode_pairs,
    encode_texts,
    left_pad,
    length_chunks,
    plan_batches,
    token_pieces,
)
from pertoken.backends.torch.backend import _RowMeans
from pertoken.backends.torch.decode import left_pad as torch_left_pad
from pertoken.backends.torch.decode import position_mask
from pertoken.errors import PertokenError
from tests.reference import ANSWERS, chat_prompts, hf_hidden


@pytest.fixture(scope="module", params=["llama", "gemma2", "qwen2"])
def family_dir(request, llama_dir, gemma_dir, qwen_dir):
    return {"llama": llama_dir, "gemma2": gemma_dir, "qwen2": qwen_dir}[request.param]


@pytest.fixture(scope="module")
def tb(family_dir):
    return load_backend(str(family_dir), "torch", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def mb(family_dir):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    return load_backend(str(family_dir), "mlx", dtype="float32", device="cpu")


def texts(b):
    """Prompt + answer token ids and prompt lengths; the second answer is empty."""
    prompts, answers = chat_prompts(b), [ANSWERS[0], "", ANSWERS[2]]
    return [b.encode(p + a) for p, a in zip(prompts, answers)], [len(b.encode(p)) for p in prompts]


def error_of(fn, *args):
    with pytest.raises(PertokenError) as e:
        fn(*args)
    return str(e.value)


# ---------------------------------------------------------------------- encoding
def test_encode_texts_matches_both_backends(tb, mb):
    ps = chat_prompts(tb)
    assert encode_texts(tb.encode, ps) == tb._encode_prompts(ps) == mb._encode_all(ps)
    for bad in ([], [ps[0], ""]):
        msg = error_of(encode_texts, tb.encode, bad)
        assert msg == error_of(tb._encode_prompts, bad) == error_of(mb._encode_all, bad)


def test_encode_texts_checks_the_model_limit(tb):
    ps = chat_prompts(tb)
    n = [len(tb.encode(p)) for p in ps]
    assert encode_texts(tb.encode, ps, limit=max(n)) == tb._encode_prompts(ps)
    with pytest.raises(PertokenError, match=rf"^prompt 2 is {n[1]} tokens long .* most {n[2]}: "):
        encode_texts(tb.encode, [ps[2], ps[1]], limit=n[2])
    with pytest.raises(PertokenError, match=r"prompt 1 \(and 1 more\)"):
        encode_texts(tb.encode, ps[:2], limit=min(n) - 1)


def test_encode_pairs_matches_torch_summaries_inputs(tb):
    ps = chat_prompts(tb)
    seqs, prompt_lens = encode_pairs(tb.encode, ps, ANSWERS, limit=512)
    assert seqs == [tb.encode(p + a) for p, a in zip(ps, ANSWERS)]
    assert prompt_lens.tolist() == [len(s) for s in tb._encode_prompts(ps)]
    with pytest.raises(PertokenError, match="^2 prompts but 1 answers$"):
        encode_pairs(tb.encode, ps[:2], ["x"])
    with pytest.raises(PertokenError, match="empty after tokenization"):
        encode_pairs(tb.encode, ["", ps[0]], ["x", "y"])
    with pytest.raises(PertokenError, match="prompt with its answer 1 is"):
        encode_pairs(tb.encode, ps[:1], ANSWERS[:1], limit=len(seqs[0]) - 1)


# ---------------------------------------------------------------------- batching
def test_length_chunks_match_mlx_chunks():
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    from pertoken.backends.mlx.backend import _chunks

    lengths = [7, 3, 3, 9, 1, 7, 2, 3]
    for size in (1, 2, 3, 8, 20):
        want = _chunks([[0] * n for n in lengths], size)
        got = length_chunks(lengths, batch_size=size)
        assert [c.tolist() for c in got] == [c.tolist() for c in want]
    msg = error_of(lambda: length_chunks(lengths, batch_size=0))
    assert msg == error_of(lambda: _chunks([[0]], 0)) == "batch size must be at least 1, not 0"


def test_length_chunks_keep_a_token_budget():
    lengths = [7, 3, 3, 9, 1, 7, 2, 3, 30]
    chunks = length_chunks(lengths, token_budget=12, batch_size=3)
    flat = np.concatenate(chunks)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert [lengths[i] for i in flat] == sorted(lengths)  # length order, stable
    for c in chunks:
        width = max(lengths[i] for i in c)
        assert len(c) <= 3 and (len(c) * width <= 12 or len(c) == 1)
    assert [c.tolist() for c in chunks][-2:] == [[3], [8]]  # 9 and 30 go alone
    assert len(length_chunks(lengths)) == 1
    with pytest.raises(PertokenError, match="token budget must be at least 1, not 0"):
        length_chunks(lengths, token_budget=0)


def test_left_pad_matches_torch_and_mlx(tb):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    from pertoken.backends.mlx.batch import Batch

    seqs, prompt_lens = texts(tb)
    got = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    want = torch_left_pad(seqs, tb.pad_id, "cpu", prompt_lens)
    assert got.ids.dtype == np.int32 and got.ids.shape == (3, max(map(len, seqs)))
    np.testing.assert_array_equal(got.ids, want.ids.numpy())
    np.testing.assert_array_equal(got.mask, want.attn.numpy().astype(bool))
    np.testing.assert_array_equal(got.pad, want.pad.numpy())
    np.testing.assert_array_equal(got.prompt_lens, want.prompt_len.numpy())
    np.testing.assert_array_equal(got.positions, (want.attn.cumsum(-1) - 1).clamp(min=0).numpy())
    m = Batch.of(seqs, tb.pad_id)
    np.testing.assert_array_equal(got.ids, np.array(m.ids))
    np.testing.assert_array_equal(got.lens, m.lens)
    np.testing.assert_array_equal(got.mask, np.array(m.valid))
    rope = np.arange(got.ids.shape[1])[None] + np.array(m.offset)[:, None]  # MLX rope positions
    np.testing.assert_array_equal(got.positions[got.mask], rope[got.mask])


def test_plan_batches_cover_every_sequence_once(tb):
    seqs, prompt_lens = texts(tb)
    batches = plan_batches(seqs, tb.pad_id, prompt_lens=prompt_lens, batch_size=2)
    assert [b.index.tolist() for b in batches] == [c.tolist() for c in length_chunks(
        [len(s) for s in seqs], batch_size=2
    )]  # fmt: skip
    for b in batches:
        for row, i in enumerate(b.index):
            assert b.ids[row, b.pad[row] :].tolist() == seqs[i]
            assert b.prompt_lens[row] == prompt_lens[i]


# ---------------------------------------------------------------------- steering positions
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steer_mask_matches_torch_mlx_and_base(tb, positions):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    import mlx.core as mx

    from pertoken.backends.mlx.batch import Batch, SteerPlan

    seqs, prompt_lens = texts(tb)
    got = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    batch = torch_left_pad(seqs, tb.pad_id, "cpu", prompt_lens)
    T = got.ids.shape[1]
    for start, t in ((0, T), (2, 3), (T, 1), (T + 4, 1)):  # prefill, a window, decode steps
        want = position_mask(batch, start, t, positions).numpy()
        np.testing.assert_array_equal(got.steer_mask(positions, start, t), want)
    plan = SteerPlan.of(Steer.single(1, np.zeros(tb.hidden_size), 1.0, positions), mx.float32)
    on = np.array(plan.prefill_on(Batch.of(seqs, tb.pad_id), np.array(prompt_lens)))[..., 0]
    np.testing.assert_array_equal(got.steer_mask(positions), on.astype(bool))
    for row, s in enumerate(seqs):
        one = steer_mask(prompt_lens[row], len(s), positions)
        np.testing.assert_array_equal(got.steer_mask(positions)[row, got.pad[row] :], one)


def test_unknown_positions_are_an_error():
    batch = left_pad([[1, 2]], 0)
    with pytest.raises(PertokenError, match="positions must be one of"):
        batch.steer_mask("answer")


# ---------------------------------------------------------------------- summary weights
def torch_weights(tb, seqs, prompt_lens) -> np.ndarray:
    """_RowMeans's weights, read back by feeding it the identity as hidden states."""
    ids, attn = tb._right_pad(seqs)
    means = _RowMeans((ids, attn), list(prompt_lens))
    T = ids.shape[1]
    means.on_row(0, torch.eye(T).expand(len(seqs), T, T))  # [B, T, hidden = T]
    right = np.stack([r[:, 0] for r in means.result()], axis=1)  # [B, 3, T] right-padded
    return np.stack([np.roll(w, T - len(s), axis=-1) for w, s in zip(right, seqs)])


def test_summary_weights_match_torch_row_means(tb):
    seqs, prompt_lens = texts(tb)
    w = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens).summary_weights()
    assert w.shape == (3, 3, max(map(len, seqs))) and w.dtype == np.float32
    np.testing.assert_allclose(w, torch_weights(tb, seqs, prompt_lens), rtol=1e-6)
    assert np.isnan(w[1, 2]).all() and not np.isnan(np.delete(w.reshape(9, -1), 5, 0)).any()
    np.testing.assert_allclose(np.nansum(w, axis=2), np.where(np.isnan(w[..., 0]), 0, 1), rtol=1e-6)


def test_summary_weights_match_mlx_mean_weights(tb):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    from pertoken.backends.mlx.batch import Batch
    from pertoken.backends.mlx.summaries import mean_weights

    seqs, prompt_lens = texts(tb)
    # row 0's prompt outgrows its sequence: MLX ends it at the last token (torch gives NaN)
    prompt_lens[0] = len(seqs[0]) + 3
    w = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens).summary_weights()
    want = mean_weights(Batch.of(seqs, tb.pad_id), np.array(prompt_lens))
    empty = want.sum(axis=2) == 0  # [B, 3]: parts MLX turns into NaN after the matmul
    np.testing.assert_array_equal(np.isnan(w).all(axis=2), empty)
    np.testing.assert_allclose(np.nan_to_num(w), want, rtol=1e-6)
    assert empty.tolist() == [[False, False, True], [False, False, True], [False, False, False]]
    np.testing.assert_allclose(w[1:], torch_weights(tb, seqs, prompt_lens)[1:], rtol=1e-6)


def test_weights_times_hidden_states_are_the_summaries(tb):
    seqs, prompt_lens = texts(tb)
    batch = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    w = batch.summary_weights()
    prompts, answers = chat_prompts(tb), [ANSWERS[0], "", ANSWERS[2]]
    want = tb.summaries(prompts, answers)
    for b, s in enumerate(seqs):
        hs = hf_hidden(tb.model, s)  # [rows, T, hidden]
        got = w[b, :, batch.pad[b] :] @ hs  # [rows, 3, hidden]
        for k, field in enumerate(want):
            np.testing.assert_allclose(got[:, k], field[b], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- token pieces
def mlx_pieces(decode, ids):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    from pertoken.backends.mlx.backend import _Pieces

    old = _Pieces(SimpleNamespace(decode=decode))
    return [old.add(t) for t in ids]


def test_token_pieces_match_both_backends(tb):
    eot = tb.tokenizer.convert_tokens_to_ids(tb.tokenizer.eos_token)
    for text in [*ANSWERS, chat_prompts(tb)[0]]:
        ids = tb.encode(text) + [eot] + tb.encode(" more")
        stream = TokenPieces(tb.decode)
        streamed = [stream.add(t) for t in ids]
        assert streamed == token_pieces(tb.decode, ids) == chat_token_pieces(tb.tokenizer, ids)
        assert streamed == mlx_pieces(tb.decode, ids)
        assert "".join(streamed) == tb.decode(ids) and stream.rest() == ""


def test_multibyte_characters_land_on_the_token_that_completes_them(tb):
    text = "café naïve 😀 ok"
    ids = tb.encode(text)
    prefixes = [tb.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes)  # the tokenizer splits characters
    pieces = token_pieces(tb.decode, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    old = chat_token_pieces(tb.tokenizer, ids)
    plain = [i for i, p in enumerate(prefixes) if "\ufffd" not in p + prefixes[i - 1 if i else 0]]
    assert [pieces[i] for i in plain] == [old[i] for i in plain] and len(plain) > 5
    cut = ids[: prefixes.index("café naïve \ufffd") + 1]  # ends inside the emoji
    stream = TokenPieces(tb.decode)
    assert "".join(stream.add(t) for t in cut) == "café naïve "
    assert stream.rest() == "\ufffd"
    assert "".join(token_pieces(tb.decode, cut)) == tb.decode(cut)


def test_rewritten_text_falls_back_to_the_token_alone(tb):
    # A decoder that tidies spaces before punctuation (WordPiece clean-up) rewrites
    # text already given out; the piece is then the token decoded alone, as on MLX.
    def tidy(ids):
        return tb.decode(ids).replace(" ,", ",").replace(" .", ".")

    ids = tb.encode("Hello , world . ok")
    pieces = token_pieces(tidy, ids)
    assert pieces == mlx_pieces(tidy, ids)
    assert any(not tidy(ids[: i + 1]).startswith(tidy(ids[:i])) for i in range(1, len(ids)))
