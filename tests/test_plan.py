"""The numpy batch plan both backends run, on the tiny models' tokenizers."""

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import steer_mask
from pertoken.backends.plan import (
    TokenPieces,
    encode_pairs,
    encode_texts,
    left_pad,
    length_chunks,
    plan_batches,
    token_pieces,
)
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
    assert encode_texts(tb.encode, ps) == [tb.encode(p) for p in ps] == [mb.encode(p) for p in ps]
    for bad in ([], [ps[0], ""]):
        msg = error_of(encode_texts, tb.encode, bad)
        assert msg == error_of(tb.next_token_logprobs, bad) == error_of(mb.next_token_logprobs, bad)


def test_encode_texts_checks_the_model_limit(tb):
    ps = chat_prompts(tb)
    n = [len(tb.encode(p)) for p in ps]
    assert encode_texts(tb.encode, ps, limit=max(n)) == [tb.encode(p) for p in ps]
    with pytest.raises(PertokenError, match=rf"^prompt 2 is {n[1]} tokens long .* most {n[2]}: "):
        encode_texts(tb.encode, [ps[2], ps[1]], limit=n[2])
    with pytest.raises(PertokenError, match=r"prompt 1 \(and 1 more\)"):
        encode_texts(tb.encode, ps[:2], limit=min(n) - 1)


def test_encode_pairs_matches_torch_summaries_inputs(tb):
    ps = chat_prompts(tb)
    seqs, prompt_lens = encode_pairs(tb.encode, ps, ANSWERS, limit=512)
    assert seqs == [tb.encode(p + a) for p, a in zip(ps, ANSWERS)]
    assert prompt_lens.tolist() == [len(tb.encode(p)) for p in ps]
    with pytest.raises(PertokenError, match="^2 prompts but 1 answers$"):
        encode_pairs(tb.encode, ps[:2], ["x"])
    with pytest.raises(PertokenError, match="empty after tokenization"):
        encode_pairs(tb.encode, ["", ps[0]], ["x", "y"])
    with pytest.raises(PertokenError, match="prompt with its answer 1 is"):
        encode_pairs(tb.encode, ps[:1], ANSWERS[:1], limit=len(seqs[0]) - 1)


# ---------------------------------------------------------------------- batching
def test_length_chunks_cut_the_length_order_into_batches():
    lengths = [7, 3, 3, 9, 1, 7, 2, 3]
    order = [4, 6, 1, 2, 7, 0, 5, 3]  # by length; equal lengths keep their input order
    for size in (1, 2, 3, 8, 20):
        got = length_chunks(lengths, batch_size=size)
        assert [c.tolist() for c in got] == [order[i : i + size] for i in range(0, 8, size)]
    msg = error_of(lambda: length_chunks(lengths, batch_size=0))
    assert msg == "batch size must be at least 1, not 0"


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


def test_left_pad_ends_every_slot_together(tb):
    seqs, prompt_lens = texts(tb)
    got = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    T = max(map(len, seqs))
    assert got.ids.dtype == np.int32 and got.ids.shape == (3, T)
    for b, s in enumerate(seqs):
        pad = T - len(s)
        assert got.pad[b] == pad and got.lens[b] == len(s)
        assert got.ids[b].tolist() == [tb.pad_id] * pad + s
        assert got.mask[b].tolist() == [False] * pad + [True] * len(s)
        assert got.positions[b].tolist() == [0] * pad + list(range(len(s)))
    np.testing.assert_array_equal(got.prompt_lens, prompt_lens)
    np.testing.assert_array_equal(left_pad(seqs, 0).prompt_lens, [len(s) for s in seqs])


def test_plan_batches_cover_every_sequence_once(tb):
    seqs, prompt_lens = texts(tb)
    batches = plan_batches(seqs, tb.pad_id, prompt_lens=prompt_lens, batch_size=2)
    assert [b.index.tolist() for b in batches] == [c.tolist() for c in length_chunks(
        [len(s) for s in seqs], batch_size=2
    )]  # fmt: skip
    for b in batches:
        for slot, i in enumerate(b.index):
            assert b.ids[slot, b.pad[slot] :].tolist() == seqs[i]
            assert b.prompt_lens[slot] == prompt_lens[i]


# ---------------------------------------------------------------------- steering positions
@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steer_mask_is_the_one_sequence_rule_per_slot(tb, positions):
    seqs, prompt_lens = texts(tb)
    got = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    T = got.ids.shape[1]
    full = got.steer_mask(positions, 0, T + 5)  # the prompts and 5 generated tokens
    for slot, s in enumerate(seqs):
        assert not full[slot, : got.pad[slot]].any()  # never on padding
        one = steer_mask(prompt_lens[slot], len(s) + 5, positions)
        np.testing.assert_array_equal(full[slot, got.pad[slot] :], one)
    for start, t in ((0, T), (2, 3), (T, 1), (T + 4, 1)):  # prefill, a window, decode steps
        np.testing.assert_array_equal(
            got.steer_mask(positions, start, t), full[:, start : start + t]
        )
    np.testing.assert_array_equal(got.steer_mask(positions), full[:, :T])
    per_slot = [positions, "prompt", "all"]  # one choice per slot
    mixed = got.steer_mask(per_slot)
    for slot, p in enumerate(per_slot):
        np.testing.assert_array_equal(mixed[slot], got.steer_mask(p)[slot])


def test_mlx_steering_mask_is_the_plans(tb):
    pytest.importorskip("mlx.core", reason="the mlx comparison needs mlx")
    import mlx.core as mx

    from pertoken.backends.mlx.batch import SteerPlan

    seqs, prompt_lens = texts(tb)
    batch = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens)
    plans = [Steer.single(1, np.ones(tb.hidden_size), 1.0, p) for p in ("prompt", "response")]
    one = SteerPlan.of(plans[1], mx.float32)
    on = np.array(one.prefill_on(batch))[..., 0]
    np.testing.assert_array_equal(on, batch.steer_mask("response"))
    mixed = SteerPlan.per_slot([plans[0], None, plans[1]], tb.hidden_size, mx.float32)
    on = np.array(mixed.prefill_on(batch))[..., 0]
    np.testing.assert_array_equal(on, batch.steer_mask(["prompt", "all", "response"]))


def test_unknown_positions_are_an_error():
    batch = left_pad([[1, 2]], 0)
    with pytest.raises(PertokenError, match="positions must be one of"):
        batch.steer_mask("answer")


# ---------------------------------------------------------------------- summary weights
def loop_weights(batch, prompt_lens) -> np.ndarray:
    """[B, 3, T] means weights position by position; NaN for an empty part."""
    B, T = batch.ids.shape
    w = np.zeros((B, 3, T))
    for b in range(B):
        p, n = int(batch.pad[b]), int(batch.lens[b])
        P = min(int(prompt_lens[b]), n)  # a prompt longer than its text ends at the last token
        w[b, 0, p : p + P] = 1 / P
        w[b, 1, p + P - 1] = 1
        if n > P:
            w[b, 2, p + P :] = 1 / (n - P)
        else:
            w[b, 2] = np.nan  # no answer: NaN throughout, so `w @ h` is NaN too
    return w


def test_summary_weights_are_the_means_of_each_part(tb):
    seqs, prompt_lens = texts(tb)
    w = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens).summary_weights()
    assert w.shape == (3, 3, max(map(len, seqs))) and w.dtype == np.float32
    np.testing.assert_allclose(w, loop_weights(left_pad(seqs, 0), prompt_lens), rtol=1e-6)
    assert np.isnan(w[1, 2]).all() and not np.isnan(np.delete(w.reshape(9, -1), 5, 0)).any()
    np.testing.assert_allclose(np.nansum(w, axis=2), np.where(np.isnan(w[..., 0]), 0, 1), rtol=1e-6)
    # slot 0's prompt outgrows its sequence: it ends at the last token, the answer is empty
    prompt_lens[0] = len(seqs[0]) + 3
    w = left_pad(seqs, tb.pad_id, prompt_lens=prompt_lens).summary_weights()
    np.testing.assert_allclose(w, loop_weights(left_pad(seqs, 0), prompt_lens), rtol=1e-6)
    empty = np.isnan(w).all(axis=2)
    assert empty.tolist() == [[False, False, True], [False, False, True], [False, False, False]]


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
def prefix_pieces(decode, ids):
    """Pieces as prefix differences of the growing text, or the token decoded alone where
    decoding rewrites text already given out."""
    out, prev = [], ""
    for i in range(len(ids)):
        text = decode(ids[: i + 1])
        out.append(text[len(prev) :] if text.startswith(prev) else decode(ids[i : i + 1]))
        prev = text
    return out


def test_token_pieces_match_both_backends(tb):
    eot = tb.tokenizer.convert_tokens_to_ids(tb.tokenizer.eos_token)
    for text in [*ANSWERS, chat_prompts(tb)[0]]:
        ids = tb.encode(text) + [eot] + tb.encode(" more")
        stream = TokenPieces(tb.decode)
        streamed = [stream.add(t) for t in ids]
        assert streamed == token_pieces(tb.decode, ids) == prefix_pieces(tb.decode, ids)
        assert "".join(streamed) == tb.decode(ids) and stream.rest() == ""


def test_multibyte_characters_land_on_the_token_that_completes_them(tb):
    text = "café naïve 😀 ok"
    ids = tb.encode(text)
    prefixes = [tb.decode(ids[: i + 1]) for i in range(len(ids))]
    assert any(p.endswith("\ufffd") for p in prefixes)  # the tokenizer splits characters
    pieces = token_pieces(tb.decode, ids)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    old = prefix_pieces(tb.decode, ids)
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
    assert pieces == prefix_pieces(tidy, ids)
    assert any(not tidy(ids[: i + 1]).startswith(tidy(ids[:i])) for i in range(1, len(ids)))
