"""The Backend protocol, one suite for every backend: each test runs on torch and on MLX, on the
tiny Llama and Gemma 2 checkpoints (Qwen 2 where noted), in float32 on the CPU.

A few probes need a backend's insides (its own capture of every row, its stop ids); they are
the helpers below, one branch per backend. Backend-specific behaviour stays in
test_torch_backend.py and test_mlx_backend.py; cross-backend agreement in test_parity.py."""

import json

import numpy as np
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import SteerTerm, steer_mask
from pertoken.errors import PertokenError
from tests.reference import ANSWERS, chat_prompts, hf_hidden, rand, stop_ids, stopping_at

prompts = chat_prompts
pytestmark = pytest.mark.usefixtures("torch_one_thread")  # tiny models gain nothing from threads


@pytest.fixture(scope="module", params=["torch", "mlx"])
def kind(request):
    if request.param == "mlx":
        pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pertoken[mlx])")
        pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pertoken[mlx])")
    return request.param


@pytest.fixture(scope="module")
def backend(kind, model_dir):
    return load_backend(str(model_dir), kind, dtype="float32", device="cpu")


# ---------------------------------------------------------------------- probes per backend
def reference_rows(backend, ids: list[int]) -> np.ndarray:
    """[n_layers + 1, T, hidden]: every row of one unpadded sequence, unbatched and uncached
    (transformers' output_hidden_states on torch, the model's own capture on MLX)."""
    if backend.name == "torch":
        return hf_hidden(backend.model, ids)
    return steered_rows(backend, ids, {})


def steered_rows(backend, ids: list[int], by_row: dict[int, np.ndarray]) -> np.ndarray:
    """Every row [n_layers + 1, T, hidden] of one sequence with `by_row` added at every
    position through the backend's own steering point."""
    got = {}
    if backend.name == "torch":
        import torch

        from pertoken.backends.torch.hooks import TapState, residual_taps

        state = TapState(
            steer={r: torch.tensor(v) for r, v in by_row.items()},
            rows=frozenset(range(backend.n_layers + 1)),
            on_row=lambda r, h: got.__setitem__(r, h[0].clone().numpy()),
        )
        with torch.no_grad(), residual_taps(backend.model, state):
            backend.model(input_ids=torch.tensor([ids]))
    else:
        import mlx.core as mx

        from pertoken.backends.mlx.batch import full_pass, ids_of, window_of
        from pertoken.backends.plan import left_pad

        batch = left_pad([ids], 0)
        steer = {row: mx.array(v) for row, v in by_row.items()}
        p = full_pass(batch, window_of(backend.model), head="none", steer=steer)
        p.observe = lambda r, h: got.__setitem__(r, np.array(h[0].astype(mx.float32)))
        backend.model(ids_of(batch), None, p)
    return np.stack([got[r] for r in range(backend.n_layers + 1)])


# ---------------------------------------------------------------------- facts and text
def test_facts(backend, kind, model_dir):
    assert backend.name == kind
    assert (backend.n_layers, backend.hidden_size) == (4, 64)
    assert (backend.dtype, backend.device) == ("float32", "cpu")
    assert backend.model_id == model_dir.name
    assert backend.model_type == json.loads((model_dir / "config.json").read_text())["model_type"]


def test_encode_adds_no_special_tokens_and_decode_skips_them(backend):
    for text in ANSWERS:
        assert backend.decode(backend.encode(text)) == text
    bos = backend.tokenizer.bos_token_id
    p = prompts(backend)[0]
    assert bos is not None and bos not in backend.encode(ANSWERS[0])
    assert backend.encode(p).count(bos) == 1  # the template's own, not another one
    assert backend.tokenizer.bos_token not in backend.decode(backend.encode(p))


def test_chat_prompt_system_handling(kind, llama_dir, gemma_dir):
    llama = load_backend(str(llama_dir), kind)
    gemma = load_backend(str(gemma_dir), kind)
    lp = llama.chat_prompt("SYS TEXT", "USER TEXT")
    assert "<|start_header_id|>system<|end_header_id|>\n\nSYS TEXT<|eot_id|>" in lp
    assert lp.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    gp = gemma.chat_prompt("SYS TEXT", "USER TEXT")
    assert "<start_of_turn>user\nSYS TEXT\n\nUSER TEXT<end_of_turn>" in gp
    assert gp.endswith("<start_of_turn>model\n")
    assert "SYS" not in gemma.chat_prompt(None, "USER TEXT") + gemma.chat_prompt("", "USER")
    assert {llama.tokenizer.convert_tokens_to_ids("<|eot_id|>")} <= stop_ids(llama)
    assert {gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>")} <= stop_ids(gemma)


# ---------------------------------------------------------------------- summaries
def test_summaries_match_teacher_forcing(backend):
    # prompt_last is the last prompt token's state; response_avg starts right after it.
    ps = prompts(backend)
    got = backend.summaries(ps, ANSWERS, batch_size=2)
    for i, (p, a) in enumerate(zip(ps, ANSWERS)):
        hs, P = reference_rows(backend, backend.encode(p + a)), len(backend.encode(p))
        want = (hs[:, :P].mean(1), hs[:, P - 1], hs[:, P:].mean(1))
        for g, w in zip(got, want, strict=True):
            assert g[i].shape == (5, 64)
            np.testing.assert_allclose(g[i], w, atol=1e-5)


def test_summaries_batch_one_equals_batch_n(backend):
    ps = prompts(backend)
    one = [backend.summaries([p], [a]) for p, a in zip(ps, ANSWERS)]
    many = backend.summaries(ps, ANSWERS, batch_size=3)
    for i in range(3):
        for g, w in zip(many, one[i]):
            assert g[i].shape == (5, 64) and g.dtype == np.float32
            np.testing.assert_allclose(g[i], w[0], rtol=1e-4, atol=1e-5)


def test_empty_answer_gives_nan_response(backend):
    s = backend.summaries(prompts(backend)[:1], [""])
    assert np.isnan(s.response_avg).all()
    assert np.isfinite(s.prompt_avg).all()
    s = backend.summaries(prompts(backend)[:2], ["", ANSWERS[1]])
    assert np.isnan(s.response_avg[0]).all() and np.isfinite(s.response_avg[1]).all()
    assert np.isfinite(s.prompt_avg).all() and np.isfinite(s.prompt_last).all()


def test_qwen2_summaries_and_batching(kind, qwen_dir):
    b = load_backend(str(qwen_dir), kind, dtype="float32", device="cpu")
    ps = prompts(b)
    assert "<|im_start|>system\nAnswer" in ps[0]
    got = b.summaries(ps, ANSWERS, batch_size=3)
    for i, (p, a) in enumerate(zip(ps, ANSWERS)):
        hs, P = reference_rows(b, b.encode(p + a)), len(b.encode(p))
        for g, w in zip(got, (hs[:, :P].mean(1), hs[:, P - 1], hs[:, P:].mean(1))):
            np.testing.assert_allclose(g[i], w, atol=1e-5)
    many = b.generate(ps, max_new_tokens=8, temperature=0, batch_size=3)
    assert many == [b.generate([p], max_new_tokens=8, temperature=0)[0] for p in ps]


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("positions", ["all", "response"])
def test_greedy_generate_batch_one_equals_batch_n(backend, positions):
    ps = prompts(backend)
    steer = Steer.single(2, rand(5), 4.0, positions=positions)
    for s in (None, steer):
        many = backend.generate(ps, max_new_tokens=12, temperature=0, batch_size=3, steer=s)
        one = [backend.generate([p], max_new_tokens=12, temperature=0, steer=s)[0] for p in ps]
        assert many == one
        assert all(len(a) > 0 for a in many)


def test_each_slot_stops_at_its_own_stop_token(backend):
    ps = prompts(backend)
    traces = [backend.trace(p, rows=[1], max_new_tokens=10).token_ids for p in ps]
    # a stop token never comes first, so pick a later one that no answer starts with
    firsts = {ids[0] for ids in traces}
    j, stop = next((j, t) for j, ids in enumerate(traces) for t in ids[1:] if t not in firsts)

    def cut(ids):
        return ids[: ids.index(stop)] if stop in ids else ids

    stopper = stopping_at(backend, stop_ids(backend) | {stop})
    out = stopper.generate(ps, max_new_tokens=10, temperature=0, batch_size=3)
    assert out == [backend.decode(cut(ids)) for ids in traces]
    assert len(cut(traces[j])) < 10 and any(len(cut(ids)) == 10 for ids in traces)
    traced = stopper.trace(ps[j], rows=[1, 2], max_new_tokens=10)
    assert traced.token_ids == cut(traces[j])
    assert traced.hidden.shape == (len(cut(traces[j])), 2, 64)


def test_sampling_is_reproducible_by_seed(backend):
    ps = prompts(backend)
    a = backend.generate(ps, max_new_tokens=10, temperature=1.0, seed=3)
    b = backend.generate(ps, max_new_tokens=10, temperature=1.0, seed=3)
    c = backend.generate(ps, max_new_tokens=10, temperature=1.0, seed=4)
    assert a == b and a != c


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_seeded_sample_does_not_depend_on_its_batch(backend, top_p):
    """With one seed per prompt, a prompt's sample is the same alone or padded in any batch."""
    ps = prompts(backend)
    opts = dict(max_new_tokens=10, temperature=1.0, top_p=top_p)
    alone = backend.generate([ps[2]], seeds=[7], **opts)[0]
    mixed = backend.generate([ps[1], ps[2], ps[0]], seeds=[1, 7, 3], batch_size=3, **opts)
    last = backend.generate([ps[0], ps[2]], seeds=[3, 7], batch_size=1, seed=99, **opts)
    assert mixed[1] == last[1] == alone and mixed[2] == last[0]
    assert len({*backend.generate([ps[2]] * 4, seeds=[7, 8, 9, 10], **opts)}) > 1
    with pytest.raises(PertokenError, match="seeds for 2 prompts"):
        backend.generate(ps[:2], seeds=[1], **opts)


def test_tiny_top_p_is_greedy(backend):
    ps = prompts(backend)
    greedy = backend.generate(ps, max_new_tokens=10, temperature=0)
    assert backend.generate(ps, max_new_tokens=10, temperature=1.5, top_p=1e-6) == greedy


# ---------------------------------------------------------------------- steering
def test_coef_zero_equals_no_steering(backend):
    p = prompts(backend)[1]
    zero = Steer.single(2, rand(0), 0.0)
    np.testing.assert_array_equal(backend.logits(p, steer=zero), backend.logits(p))
    assert backend.generate([p], max_new_tokens=8, temperature=0, steer=zero) == (
        backend.generate([p], max_new_tokens=8, temperature=0)
    )
    assert not np.allclose(
        backend.logits(p, steer=Steer.single(2, rand(0), 8.0)), backend.logits(p)
    )


def test_steering_row_changes_only_later_rows(backend):
    # Row L is the output of block L-1: rows before it stay, row L moves by exactly the vector.
    ids = backend.encode(prompts(backend)[1])
    base = steered_rows(backend, ids, {})
    np.testing.assert_allclose(base, reference_rows(backend, ids), rtol=1e-5, atol=1e-5)
    L = 2
    steered = steered_rows(backend, ids, {L: 3.0 * rand(1)})
    np.testing.assert_array_equal(steered[:L], base[:L])
    np.testing.assert_allclose(
        steered[L] - base[L], np.broadcast_to(3.0 * rand(1), base[L].shape), atol=1e-5
    )
    for row in range(L + 1, backend.n_layers + 1):
        assert not np.allclose(steered[row], base[row], atol=1e-4)


def test_positions_select_the_steered_tokens(backend):
    # Steering the last row acts after every attention, so only its own positions' logits move.
    p, a = prompts(backend)[0], ANSWERS[0]
    P, T = len(backend.encode(p)), len(backend.encode(p + a))
    plain = backend.logits(p + a)
    assert plain.shape == (T, backend.model.model.embed_tokens.weight.shape[0])
    assert plain.dtype == np.float32
    for positions in ("all", "prompt", "response"):
        s = Steer.single(4, rand(2), 5.0, positions=positions)
        moved = np.abs(backend.logits(p + a, steer=s, prompt_len=P) - plain).max(-1) > 1e-4
        np.testing.assert_array_equal(moved, steer_mask(P, T, positions))


def test_response_steering_leaves_prompt_logits(backend):
    p, a = prompts(backend)[0], ANSWERS[0]
    P = len(backend.encode(p))
    steer = Steer.single(1, rand(2), 5.0, positions="response")
    plain, steered = backend.logits(p + a), backend.logits(p + a, steer=steer, prompt_len=P)
    np.testing.assert_allclose(steered[: P - 1], plain[: P - 1], atol=1e-5)
    assert not np.allclose(steered[P - 1 :], plain[P - 1 :], atol=1e-3)


def test_several_rows_at_once_add_up(backend):
    p, v = prompts(backend)[0], rand(3)
    two = Steer([SteerTerm(1, v, 1.0), SteerTerm(1, v, 2.0)])
    np.testing.assert_allclose(
        backend.logits(p, steer=two), backend.logits(p, steer=Steer.single(1, v, 3.0)), atol=1e-5
    )
    multi = Steer([SteerTerm(1, v, 2.0), SteerTerm(3, -v, 2.0)])
    assert not np.allclose(backend.logits(p, steer=multi), backend.logits(p, steer=two))


# ---------------------------------------------------------------------- traces and logprobs
def test_trace_states_match_teacher_forcing(backend):
    # Each answer token's state is taken at the token's own position.
    p = prompts(backend)[0]
    seen = []
    t = backend.trace(
        p, rows=[0, 2, 4], max_new_tokens=9, on_token=lambda i, s, h: seen.append((i, s, h))
    )
    T = len(t.token_ids)
    assert T == 9 and t.hidden.shape == (T, 3, 64) and t.hidden.dtype == np.float32
    assert [i for i, _, _ in seen] == list(range(T)) and [s for _, s, _ in seen] == t.tokens
    np.testing.assert_array_equal(np.stack([h for _, _, h in seen]), t.hidden)
    assert "".join(t.tokens) == t.text == backend.generate([p], max_new_tokens=9, temperature=0)[0]
    hs = reference_rows(backend, backend.encode(p) + t.token_ids)
    P = len(backend.encode(p))
    np.testing.assert_allclose(t.hidden, hs[[0, 2, 4], P:].transpose(1, 0, 2), atol=1e-5)


def test_steered_trace_differs(backend):
    p = prompts(backend)[0]
    plain = backend.trace(p, rows=[3], max_new_tokens=6)
    steered = backend.trace(p, rows=[3], max_new_tokens=6, steer=Steer.single(2, rand(4), 10.0))
    assert not np.allclose(plain.hidden[:1], steered.hidden[:1])


def test_next_token_logprobs(backend):
    ps = prompts(backend)
    lp = backend.next_token_logprobs(ps, batch_size=2)
    assert lp.shape == (3, backend.logits(ps[0]).shape[1]) and lp.dtype == np.float32
    np.testing.assert_allclose(np.exp(lp).sum(-1), 1.0, atol=1e-5)
    for i, p in enumerate(ps):
        last = backend.logits(p)[-1]
        want = last - np.log(np.exp(last - last.max()).sum()) - last.max()
        np.testing.assert_allclose(lp[i], want, atol=1e-5)


# ---------------------------------------------------------------------- bad inputs
def test_bad_inputs_are_clear_errors(backend, kind, tmp_path, llama_dir):
    with pytest.raises(PertokenError, match="does not exist"):
        load_backend(str(tmp_path / "nope"), kind)
    with pytest.raises(PertokenError, match="dtype"):
        load_backend(str(llama_dir), kind, dtype="int8")
    p = prompts(backend)[0]
    with pytest.raises(PertokenError, match="hidden size is 64"):
        backend.generate([p], max_new_tokens=2, steer=Steer.single(1, np.ones(32), 1.0))
    with pytest.raises(PertokenError, match=r"outside 1\.\.4"):
        backend.generate([p], max_new_tokens=2, steer=Steer.single(5, np.ones(64), 1.0))
    with pytest.raises(PertokenError, match=r"outside 1\.\.4"):
        backend.logits(p, steer=Steer.single(0, np.ones(64), 1.0))
    with pytest.raises(PertokenError, match="no prompts"):
        backend.generate([], max_new_tokens=2)
    with pytest.raises(PertokenError, match="no prompts"):
        backend.summaries([], [])
    with pytest.raises(PertokenError, match="no prompts"):
        backend.next_token_logprobs([])
    with pytest.raises(PertokenError, match="2 prompts but 1 answers"):
        backend.summaries([p, p], ["x"])
    for empty in (lambda: backend.generate([p, ""]), lambda: backend.logits("")):
        with pytest.raises(PertokenError, match="empty after tokenization"):
            empty()
    with pytest.raises(PertokenError, match="outside 0..4"):
        backend.trace(p, rows=[7])
    with pytest.raises(PertokenError, match="no layers"):
        backend.trace(p, rows=[])


# Where the backends once differed, before both planned their batches with backends/plan.py.
@pytest.mark.parametrize("case", ["empty prompt in summaries", "batch size 0"])
def test_contract_gaps(backend, case):
    p = prompts(backend)[0]
    if case == "empty prompt in summaries":
        with pytest.raises(PertokenError, match="empty after tokenization"):
            backend.summaries([p, ""], ["x", "y"])
    else:
        for call in (
            lambda: backend.summaries([p], ["x"], batch_size=0),
            lambda: backend.next_token_logprobs([p], batch_size=0),
        ):
            with pytest.raises(PertokenError, match="batch size must be at least 1, not 0"):
                call()
