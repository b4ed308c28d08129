import copy
import json
import shutil

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="the mlx backend needs mlx (pip install 'pertoken[mlx]')")
pytest.importorskip("mlx_lm", reason="the mlx backend needs mlx-lm (pip install 'pertoken[mlx]')")

from pertoken.backends import Steer, load_backend  # noqa: E402
from pertoken.backends.base import SteerTerm  # noqa: E402
from pertoken.errors import PertokenError  # noqa: E402
from tests.reference import ANSWERS, chat_prompts  # noqa: E402


@pytest.fixture(scope="module")
def backend(model_dir):
    return load_backend(str(model_dir), "mlx", dtype="float32", device="cpu")


prompts = chat_prompts


def rand(seed, n=64):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def test_facts(backend, model_dir):
    assert backend.name == "mlx"
    assert (backend.n_layers, backend.hidden_size) == (4, 64)
    assert (backend.dtype, backend.device) == ("float32", "cpu")
    assert backend.model_id == model_dir.name


def test_default_dtype_on_cpu_is_float32(llama_dir):
    assert load_backend(str(llama_dir), "mlx").dtype == "float32"


def test_cli_loads_the_mlx_backend(llama_dir):
    from pertoken.backends.mlx import MLXBackend
    from pertoken.cli import load_model

    b = load_model(str(llama_dir), "mlx", None, "cpu")
    assert isinstance(b, MLXBackend) and b.device == "cpu"
    with pytest.raises(PertokenError, match="gpu or cpu"):
        load_model(str(llama_dir), "mlx", None, "cuda")


def test_summaries_batch_one_equals_batch_n(backend):
    ps = prompts(backend)
    one = [backend.summaries([p], [a]) for p, a in zip(ps, ANSWERS)]
    many = backend.summaries(ps, ANSWERS, batch_size=3)
    for i in range(3):
        for g, w in zip(many, one[i]):
            assert g[i].shape == (5, 64) and g.dtype == np.float32
            np.testing.assert_allclose(g[i], w[0], rtol=1e-4, atol=1e-5)


def test_summaries_spans(backend):
    # prompt_last is the last prompt token's state; response_avg starts right after it.
    p, a = prompts(backend)[0], ANSWERS[0]
    ids, P = backend.encode(p + a), len(backend.encode(p))
    hs = hf_hidden_mlx(backend, ids)
    s = backend.summaries([p], [a])
    np.testing.assert_allclose(s.prompt_last[0], hs[:, P - 1], atol=1e-5)
    np.testing.assert_allclose(s.prompt_avg[0], hs[:, :P].mean(1), atol=1e-5)
    np.testing.assert_allclose(s.response_avg[0], hs[:, P:].mean(1), atol=1e-5)


def hf_hidden_mlx(backend, ids):
    """Every row of one unpadded sequence through the MLX model's own capture."""
    import mlx.core as mx

    from pertoken.backends.mlx.batch import Batch, full_pass, window_of

    got = {}
    batch = Batch.of([ids])
    p = full_pass(batch, window_of(backend.model), head="none")
    p.observe = lambda r, h: got.__setitem__(r, h[0].astype(mx.float32))
    backend.model(batch.ids, None, p)
    return np.stack([np.array(got[r]) for r in range(backend.n_layers + 1)])


def test_empty_answer_gives_nan_response(backend):
    s = backend.summaries(prompts(backend)[:2], ["", ANSWERS[1]])
    assert np.isnan(s.response_avg[0]).all() and np.isfinite(s.response_avg[1]).all()
    assert np.isfinite(s.prompt_avg).all() and np.isfinite(s.prompt_last).all()


@pytest.mark.parametrize("positions", ["all", "response"])
def test_greedy_generate_batch_one_equals_batch_n(backend, positions):
    ps = prompts(backend)
    steer = Steer.single(2, rand(5), 4.0, positions=positions)
    for s in (None, steer):
        many = backend.generate(ps, max_new_tokens=12, temperature=0, batch_size=3, steer=s)
        one = [backend.generate([p], max_new_tokens=12, temperature=0, steer=s)[0] for p in ps]
        assert many == one
        assert all(len(a) > 0 for a in many)


def test_each_row_stops_at_its_own_stop_token(backend):
    ps = prompts(backend)
    traces = [backend.trace(p, rows=[1], max_new_tokens=10).token_ids for p in ps]
    # a stop token never comes first, so pick a later one that no answer starts with
    firsts = {ids[0] for ids in traces}
    j, stop = next((j, t) for j, ids in enumerate(traces) for t in ids[1:] if t not in firsts)

    def cut(ids):
        return ids[: ids.index(stop)] if stop in ids else ids

    stopper = copy.copy(backend)
    stopper.stop = set(backend.stop) | {stop}
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


def test_tiny_top_p_is_greedy(backend):
    ps = prompts(backend)
    greedy = backend.generate(ps, max_new_tokens=10, temperature=0)
    assert backend.generate(ps, max_new_tokens=10, temperature=1.5, top_p=1e-6) == greedy


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


def test_steering_adds_to_its_row_only(backend):
    import mlx.core as mx

    from pertoken.backends.mlx.batch import Batch, full_pass, window_of

    ids = backend.encode(prompts(backend)[1])
    base = hf_hidden_mlx(backend, ids)
    got = {}
    batch = Batch.of([ids])
    p = full_pass(batch, window_of(backend.model), head="none", steer={2: mx.array(3 * rand(1))})
    p.observe = lambda r, h: got.__setitem__(r, np.array(h[0]))
    backend.model(batch.ids, None, p)
    steered = np.stack([got[r] for r in range(5)])
    np.testing.assert_array_equal(steered[:2], base[:2])
    np.testing.assert_allclose(
        steered[2] - base[2], np.broadcast_to(3 * rand(1), (len(ids), 64)), atol=1e-5
    )
    assert not np.allclose(steered[3:], base[3:], atol=1e-4)


def test_positions_select_the_steered_tokens(backend):
    # Steering the last row acts after every attention, so only its own positions' logits move.
    p, a = prompts(backend)[0], ANSWERS[0]
    P, T = len(backend.encode(p)), len(backend.encode(p + a))
    plain = backend.logits(p + a)
    assert plain.shape == (T, backend.model.model.embed_tokens.weight.shape[0])
    from pertoken.backends.base import steer_mask

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


def test_trace_states_are_each_tokens_own_position(backend):
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
    hs = hf_hidden_mlx(backend, backend.encode(p) + t.token_ids)
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


def test_chat_prompt_system_handling(llama_dir, gemma_dir):
    llama = load_backend(str(llama_dir), "mlx")
    gemma = load_backend(str(gemma_dir), "mlx")
    lp = llama.chat_prompt("SYS TEXT", "USER TEXT")
    assert "<|start_header_id|>system<|end_header_id|>\n\nSYS TEXT<|eot_id|>" in lp
    assert lp.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    gp = gemma.chat_prompt("SYS TEXT", "USER TEXT")
    assert "<start_of_turn>user\nSYS TEXT\n\nUSER TEXT<end_of_turn>" in gp
    assert gp.endswith("<start_of_turn>model\n")
    assert "SYS" not in gemma.chat_prompt(None, "USER TEXT") + gemma.chat_prompt("", "USER")
    assert {llama.tokenizer.convert_tokens_to_ids("<|eot_id|>")} <= llama.stop
    assert {gemma.tokenizer.convert_tokens_to_ids("<end_of_turn>")} <= gemma.stop


def test_bfloat16_tracks_float32(llama_dir):
    f32 = load_backend(str(llama_dir), "mlx", dtype="float32")
    bf16 = load_backend(str(llama_dir), "mlx", dtype="bfloat16")
    assert bf16.dtype == "bfloat16"
    p = prompts(f32)[0]
    a, b = f32.summaries([p], [ANSWERS[0]]), bf16.summaries([p], [ANSWERS[0]])
    assert b.response_avg.dtype == np.float32
    rel = np.linalg.norm(a.response_avg - b.response_avg, axis=-1) / np.linalg.norm(
        a.response_avg, axis=-1
    )
    assert rel.max() < 0.05


@pytest.fixture(scope="module")
def quantized_dir(model_dir, tmp_path_factory):
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q4") / f"{model_dir.name}-4bit"
    convert(str(model_dir), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=32)
    return out


def test_quantized_checkpoint_runs_every_method(quantized_dir, backend):
    import mlx.nn as nn

    q = load_backend(str(quantized_dir), "mlx", dtype="float32")
    assert json.loads((quantized_dir / "config.json").read_text())["quantization"]["bits"] == 4
    assert isinstance(q.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ps = prompts(q)
    s = q.summaries(ps, ANSWERS)
    assert s.response_avg.shape == (3, 5, 64) and np.isfinite(s.response_avg).all()
    full = backend.summaries(ps, ANSWERS)
    cos = (s.response_avg * full.response_avg).sum(-1) / (
        np.linalg.norm(s.response_avg, axis=-1) * np.linalg.norm(full.response_avg, axis=-1)
    )
    assert cos.min() > 0.9  # the dequantised residual stream stays close to the original
    steer = Steer.single(2, rand(6), 4.0, positions="response")
    out = q.generate(ps, max_new_tokens=6, temperature=0, steer=steer)
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    t = q.trace(ps[0], rows=[1, 4], max_new_tokens=5, steer=steer)
    assert t.hidden.shape == (len(t.token_ids), 2, 64) and np.isfinite(t.hidden).all()
    assert np.isfinite(q.logits(ps[0], steer=steer)).all()
    assert np.isfinite(q.next_token_logprobs(ps)).all()


def test_bad_inputs_are_clear_errors(backend, tmp_path, llama_dir):
    with pytest.raises(PertokenError, match="does not exist"):
        load_backend(str(tmp_path / "nope"), "mlx")
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
    with pytest.raises(PertokenError, match="2 prompts but 1 answers"):
        backend.summaries([p, p], ["x"])
    with pytest.raises(PertokenError, match="outside 0..4"):
        backend.trace(p, rows=[7])
    with pytest.raises(PertokenError, match="dtype"):
        load_backend(str(llama_dir), "mlx", dtype="int8")
    other = tmp_path / "gpt2"
    shutil.copytree(llama_dir, other)
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(PertokenError, match="llama, mistral, qwen2, gemma2"):
        load_backend(str(other), "mlx")
