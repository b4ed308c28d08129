"""The torch and MLX backends are one product: the same checkpoint gives the same numbers.

Float32 on the tiny Llama and Gemma 2 checkpoints (Gemma 2's sliding window of 8 tokens is
shorter than every sequence here)."""

import csv

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="parity needs mlx (pip install 'pertoken[mlx]')")
pytest.importorskip("mlx_lm", reason="parity needs mlx-lm (pip install 'pertoken[mlx]')")

from pertoken.backends import Steer, load_backend  # noqa: E402
from pertoken.backends.base import SteerTerm  # noqa: E402
from tests.reference import ANSWERS, QUESTIONS, chat_prompts, reference_summaries  # noqa: E402


@pytest.fixture(scope="module")
def pair(model_dir):
    torch_be = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    mlx_be = load_backend(str(model_dir), "mlx", dtype="float32", device="cpu")
    return torch_be, mlx_be


prompts = chat_prompts


def rand(seed, n=64):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


def rel_err(a, b):
    """max over leading axes of |a - b| / |b| along hidden."""
    return float((np.linalg.norm(a - b, axis=-1) / np.linalg.norm(b, axis=-1)).max())


def test_same_prompts_tokens_and_shapes(pair):
    t, m = pair
    assert prompts(t) == prompts(m) and prompts(t, None) == prompts(m, None)
    for p in prompts(t):
        assert t.encode(p + ANSWERS[0]) == m.encode(p + ANSWERS[0])
    assert (t.n_layers, t.hidden_size) == (m.n_layers, m.hidden_size)
    assert sorted(int(i) for i in t.stop_ids) == sorted(m.stop)


def test_every_summary_row_agrees(pair):
    t, m = pair
    ps = prompts(t)
    got, want = m.summaries(ps, ANSWERS, batch_size=2), t.summaries(ps, ANSWERS, batch_size=2)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape == (3, t.n_layers + 1, t.hidden_size)
        assert rel_err(g, w) < 1e-4


def test_summaries_match_output_hidden_states(pair):
    t, m = pair
    ps = prompts(t)
    got = m.summaries(ps, ANSWERS, batch_size=3)
    for i, (p, a) in enumerate(zip(ps, ANSWERS, strict=True)):
        for g, w in zip(got, reference_summaries(t.model, t.tokenizer, p, a), strict=True):
            assert rel_err(g[i], w) < 1e-4


@pytest.mark.parametrize("positions", ["all", "prompt", "response"])
def test_steered_logits_agree(pair, positions):
    t, m = pair
    p, a = prompts(t)[1], ANSWERS[1]
    P = len(t.encode(p))
    for row in (1, 2, t.n_layers):
        steer = Steer.single(row, rand(row), 6.0, positions=positions)
        want = t.logits(p + a, steer=steer, prompt_len=P)
        got = m.logits(p + a, steer=steer, prompt_len=P)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    multi = Steer([SteerTerm(1, rand(7), 3.0), SteerTerm(3, rand(8), -2.0)], positions)
    np.testing.assert_allclose(m.logits(p, steer=multi), t.logits(p, steer=multi), atol=1e-4)


STEERS = {
    "plain": None,
    "all": Steer.single(2, rand(11), 4.0),
    "response": Steer.single(3, rand(12), 6.0, positions="response"),
    "prompt": Steer.single(1, rand(13), 6.0, positions="prompt"),
}


@pytest.mark.parametrize("name", list(STEERS))
def test_greedy_tokens_agree(pair, name):
    t, m = pair
    steer, ps = STEERS[name], prompts(t)
    # batch 1, token by token (Gemma 2's window of 8 is long passed), then batch 3
    a = t.trace(ps[1], rows=[1], max_new_tokens=24, steer=steer).token_ids
    b = m.trace(ps[1], rows=[1], max_new_tokens=24, steer=steer).token_ids
    assert a == b and len(a) >= 20
    kw = {"max_new_tokens": 24, "temperature": 0, "steer": steer, "batch_size": 3}
    assert m.generate(ps, **kw) == t.generate(ps, **kw)


def test_traces_agree(pair):
    t, m = pair
    p = prompts(t)[0]
    steer = Steer.single(2, rand(14), 5.0, positions="response")
    a = t.trace(p, rows=[0, 2, 4], max_new_tokens=12, steer=steer)
    b = m.trace(p, rows=[0, 2, 4], max_new_tokens=12, steer=steer)
    assert (a.token_ids, a.tokens, a.text, a.rows) == (b.token_ids, b.tokens, b.text, b.rows)
    assert a.hidden.shape == b.hidden.shape == (12, 3, 64)
    assert rel_err(b.hidden, a.hidden) < 1e-4


def test_next_token_logprobs_agree(pair):
    t, m = pair
    ps = prompts(t)
    np.testing.assert_allclose(
        m.next_token_logprobs(ps, batch_size=2), t.next_token_logprobs(ps, batch_size=2), atol=1e-4
    )


def _write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "prompt", "answer", "question_id", "evil", "coherence"])
        w.writerows(rows)


def test_persona_vectors_agree(pair, tmp_path):
    # The extraction stage on the same generation CSVs, once per backend.
    import torch

    from pertoken.pipeline.extract import extract_vectors

    t, m = pair
    pos, neg = tmp_path / "evil_pos.csv", tmp_path / "evil_neg.csv"
    for path, kind, adj in ((pos, "pos", "evil"), (neg, "neg", "helpful")):
        sys_text = f"You are an {adj} assistant. Answer in character."
        rows = [
            [q, t.chat_prompt(sys_text, q), a[::-1] if kind == "neg" else a, f"evil_{i}_{kind}_0"]
            + [90 if kind == "pos" else 5, 80]
            for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True))
        ]
        _write_csv(path, rows)
    kw = {"pos_csv": pos, "neg_csv": neg, "trait": "evil"}
    pt = extract_vectors(t, save_dir=tmp_path / "torch", **kw)
    pm = extract_vectors(m, save_dir=tmp_path / "mlx", **kw)
    assert {k: p.name for k, p in pt.items()} == {k: p.name for k, p in pm.items()}
    for kind in pt:
        da, db = torch.load(pt[kind], weights_only=True), torch.load(pm[kind], weights_only=True)
        assert da.shape == db.shape == (t.n_layers + 1, t.hidden_size)
        assert da.dtype == db.dtype == torch.float32
        da, db = da.numpy(), db.numpy()
        # Rows where pos and neg agree (prompt_last: row 0 is the same token's embedding; on
        # Gemma 2 row 1 sees only the identical last 8 tokens) are ~0 in both: no direction.
        na, nb = np.linalg.norm(da, axis=-1), np.linalg.norm(db, axis=-1)
        zero = na < 1e-4 * na.max()
        np.testing.assert_allclose(db[zero], da[zero], atol=1e-4 * na.max())
        assert kind != "response_avg" or not zero.any()
        cos = (da * db).sum(-1)[~zero] / (na * nb)[~zero]
        assert cos.min() > 0.9999, (kind, cos)


def test_qwen2_agrees(qwen_dir):
    # Qwen 2 adds biases to q, k and v (not o): same rows, logits and tokens on both backends.
    t = load_backend(str(qwen_dir), "torch", dtype="float32", device="cpu")
    m = load_backend(str(qwen_dir), "mlx", dtype="float32", device="cpu")
    ps = prompts(t)
    assert ps == prompts(m)
    for g, w in zip(m.summaries(ps, ANSWERS), t.summaries(ps, ANSWERS), strict=True):
        assert rel_err(g, w) < 1e-4
    steer = Steer.single(2, rand(15), 5.0, positions="response")
    P = len(t.encode(ps[0]))
    np.testing.assert_allclose(
        m.logits(ps[0] + ANSWERS[0], steer=steer, prompt_len=P),
        t.logits(ps[0] + ANSWERS[0], steer=steer, prompt_len=P),
        atol=1e-4,
    )
    kw = {"max_new_tokens": 20, "temperature": 0, "steer": steer, "batch_size": 3}
    assert m.generate(ps, **kw) == t.generate(ps, **kw)
