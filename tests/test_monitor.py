import io
import json

import numpy as np
import pytest

from pertoken.backends.base import Steer
from pertoken.errors import PertokenError
from pertoken.pipeline.monitor import load_traces, monitor
from pertoken.pipeline.trace.inputs import read_prompts
from pertoken.vectors import PersonaVector
from tests.fake_backend import FakeBackend


def _vec(seed, shape=(5, 16)):
    return PersonaVector(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.fixture
def fake():
    return FakeBackend()


@pytest.fixture
def vectors():
    return {"paternalism": _vec(1), "deception": _vec(2)}


def per_token_hidden(backend, chat, token_ids, row):
    """Each answer token's state at `row`, recovered from response means of growing prefixes."""
    answers = [backend.decode(token_ids[: k + 1]) for k in range(len(token_ids))]
    means = backend.summaries([chat] * len(answers), answers).response_avg[:, row]  # [T, hidden]
    sums = means.astype(np.float64) * np.arange(1, len(answers) + 1)[:, None]
    return np.diff(sums, axis=0, prepend=0)  # [T, hidden]


def test_trace_json_layout_and_projections_match_summaries(fake, vectors, tmp_path):
    [rec] = monitor(
        fake,
        prompts=["how are you"],
        vectors=vectors,
        layers=[1, 3],
        out_dir=tmp_path,
        max_new_tokens=12,
        live=False,
    )
    data = json.loads((tmp_path / "trace.json").read_text())
    assert data == json.loads(json.dumps(rec))
    assert data["vectors"] == ["paternalism", "deception"] and data["layers"] == [1, 3]
    assert data["prompt"] == "how are you" and data["system"] is None
    assert data["settings"]["model"] == fake.model_id and data["settings"]["max_new_tokens"] == 12
    T = len(data["tokens"])
    assert T == 12 and "".join(data["tokens"]) == data["text"]
    assert np.array(data["projections"]).shape == (T, 2, 2)
    chat = fake.chat_prompt(None, "how are you")
    for k, name in enumerate(data["vectors"]):
        for j, row in enumerate(data["layers"]):
            v = vectors[name].data[row].astype(np.float64)
            h = per_token_hidden(fake, chat, data["token_ids"], row)
            want = h @ v / np.sqrt(v @ v)
            got = np.array(data["projections"])[:, k, j]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
            whole = fake.summaries([chat], [data["text"]]).response_avg[0, row] @ v
            assert data["mean"][k][j] == pytest.approx(whole / np.sqrt(v @ v), rel=1e-5)
    assert (tmp_path / "trace.html").is_file()


def test_several_prompts_go_under_traces(fake, vectors, tmp_path):
    recs = monitor(
        fake,
        prompts=["one", "two", "three"],
        vectors=vectors,
        layers=[2],
        system="be brief",
        out_dir=tmp_path,
        max_new_tokens=5,
        live=False,
    )
    data = json.loads((tmp_path / "trace.json").read_text())
    assert [t["prompt"] for t in data["traces"]] == ["one", "two", "three"]
    assert all(t["system"] == "be brief" for t in data["traces"])
    assert load_traces(tmp_path / "trace.json") == json.loads(json.dumps(recs))
    assert [t["label"] for t in recs] == ["prompt 1", "prompt 2", "prompt 3"]


def test_compare_unsteered_adds_the_plain_answer_with_the_same_seed(fake, vectors, tmp_path):
    st = Steer.single(2, vectors["paternalism"].data[2], 4.0)
    recs = monitor(
        fake,
        prompts=["hello"],
        vectors=vectors,
        layers=[2],
        steer=st,
        seed=3,
        compare_unsteered=True,
        out_dir=tmp_path,
        max_new_tokens=10,
        live=False,
    )
    assert [r["label"] for r in recs] == ["answer (unsteered)", "answer (steered)"]
    assert recs[0]["settings"]["steer"] is None
    assert recs[1]["settings"]["steer"]["terms"][0]["coef"] == 4.0
    assert recs[0]["text"] != recs[1]["text"]
    assert [c["seed"] for c in fake.calls if c["kind"] == "trace"] == [3, 3]
    # Adding the paternalism direction raises the projection onto it.
    assert recs[1]["mean"][0][0] > recs[0]["mean"][0][0]


def test_live_output_is_coloured_on_a_tty_and_plain_otherwise(fake, vectors):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty, pipe = Tty(), io.StringIO()
    kw = dict(prompts=["hi"], vectors=vectors, layers=[1], out_dir=None, max_new_tokens=8)
    kw["live"] = True
    rec = monitor(fake, stream=tty, **kw)[0]
    monitor(fake, stream=pipe, **kw)
    assert "\x1b[" not in pipe.getvalue() and pipe.getvalue().startswith(rec["text"])
    assert "\x1b[30;48;5;" in tty.getvalue()
    assert "mean projection: paternalism@1=" in pipe.getvalue()


def test_on_trace_hook_can_add_features(fake, vectors, tmp_path):
    def add(rec, trace):
        rec["features"] = [[{"id": 7, "act": float(h[0, 0])}] for h in trace.hidden]

    [rec] = monitor(
        fake,
        prompts=["hi"],
        vectors=vectors,
        layers=[1],
        out_dir=tmp_path,
        max_new_tokens=4,
        live=False,
        on_trace=add,
    )
    assert len(rec["features"]) == len(rec["tokens"])
    assert json.loads((tmp_path / "trace.json").read_text())["features"][0][0]["id"] == 7


def test_interrupted_run_keeps_finished_traces(fake, vectors, tmp_path):
    def stop_on_second(rec, trace):
        if rec["prompt"] == "two":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        monitor(
            fake,
            prompts=["one", "two"],
            vectors=vectors,
            layers=[1],
            out_dir=tmp_path,
            max_new_tokens=4,
            live=False,
            on_trace=stop_on_second,
        )
    assert load_traces(tmp_path / "trace.json")[0]["prompt"] == "one"


def test_bad_vectors_and_layers_are_clear_errors(fake, tmp_path):
    kw = dict(prompts=["hi"], out_dir=tmp_path, live=False)
    with pytest.raises(PertokenError, match="another model"):
        monitor(fake, vectors={"x": _vec(0, (5, 32))}, layers=[1], **kw)
    with pytest.raises(PertokenError, match="outside 0..4"):
        monitor(fake, vectors={"x": _vec(0)}, layers=[9], **kw)
    zero = PersonaVector(np.zeros((5, 16), np.float32))
    with pytest.raises(PertokenError, match="all zeros"):
        monitor(fake, vectors={"x": zero}, layers=[1], **kw)
    assert not (tmp_path / "trace.json").exists()


def test_read_prompts_lines_and_json(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \n")
    (tmp_path / "p.json").write_text(json.dumps(["a <b>", "c\nd"]))
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]
    assert read_prompts(tmp_path / "p.json") == ["a <b>", "c\nd"]
    (tmp_path / "bad.json").write_text('["a", ')
    with pytest.raises(PertokenError, match="not valid JSON"):
        read_prompts(tmp_path / "bad.json")
    with pytest.raises(PertokenError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_cli_monitor_writes_one_page_for_a_prompt_file(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from pertoken import cli
    from pertoken.commands import options
    from pertoken.vectors import save_vector

    fake = FakeBackend()
    monkeypatch.setattr(options, "load_model", lambda *a: fake)
    v1 = save_vector(_vec(1), tmp_path / "pat.pt")
    v2 = save_vector(_vec(2), tmp_path / "dec.pt")
    (tmp_path / "p.txt").write_text("one\ntwo\n")
    out = tmp_path / "out"
    args = [
        "monitor",
        "-m",
        "x",
        "--vector",
        f"paternalism={v1}",
        "--vector",
        str(v2),
        "--layers",
        "1,3",
        "--prompts",
        str(tmp_path / "p.txt"),
        "--steer",
        f"{v1}:2:3",
        "--compare-unsteered",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        "zero",
    ]
    res = CliRunner().invoke(cli.main, args)
    assert res.exit_code == 0, res.output
    traces = load_traces(out / "trace.json")
    assert [t["prompt"] for t in traces] == ["zero", "zero", "one", "one", "two", "two"]
    assert traces[0]["vectors"] == ["paternalism", "dec"]
    assert traces[1]["settings"]["steer_files"] == ["pat.pt layer 2 coef 3"]
    html = (out / "trace.html").read_text()
    assert html.count('<script type="application/json"') == 1
    res = CliRunner().invoke(
        cli.main,
        ["monitor", "-m", "x", "--vector", str(v1), "--layers", "1", "--compare-unsteered", "hi"],
    )
    assert res.exit_code == 1 and "--compare-unsteered needs --steer" in res.output


# ---------------------------------------------------------------- the torch backend, tiny models
QUESTIONS = ["Explain rain", "What should I do about money?", "hi", "Why is the sky blue?"]


@pytest.fixture(scope="module")
def tiny(model_dir):
    from pertoken.backends import load_backend

    return load_backend(str(model_dir), "torch", dtype="float32", device="cpu")


def test_torch_projections_match_hidden_states_and_summaries(tiny, tmp_path):
    from tests.reference import hf_hidden

    vecs = {"a": _vec(1, (5, 64)), "b": _vec(2, (5, 64))}
    layers = [1, 4]  # row 4 is the last hidden state, with the final norm
    recs = monitor(
        tiny,
        prompts=QUESTIONS,
        vectors=vecs,
        layers=layers,
        max_new_tokens=8,
        out_dir=tmp_path,
        live=False,
    )
    checked_summaries = 0
    for rec in recs:
        p_ids = tiny.encode(rec["chat_prompt"])
        hs = hf_hidden(tiny.model, p_ids + rec["token_ids"])[:, len(p_ids) :]  # [rows, T, hidden]
        proj = np.array(rec["projections"])  # [T, K, L]
        assert proj.shape == (len(rec["tokens"]), 2, 2)
        for k, name in enumerate(rec["vectors"]):
            for j, row in enumerate(layers):
                v = vecs[name].data[row].astype(np.float64)
                want = hs[row].astype(np.float64) @ v / np.linalg.norm(v)
                np.testing.assert_allclose(proj[:, k, j], want, rtol=1e-4, atol=1e-4)
                # Where re-tokenizing the answer gives back its tokens, the mean over tokens
                # equals the projection of summaries' response_avg.
                if tiny.encode(rec["chat_prompt"] + rec["text"]) == p_ids + rec["token_ids"]:
                    s = tiny.summaries([rec["chat_prompt"]], [rec["text"]]).response_avg[0, row]
                    assert rec["mean"][k][j] == pytest.approx(s @ v / np.linalg.norm(v), abs=1e-4)
                    checked_summaries += 1
    assert checked_summaries > 0
    assert load_traces(tmp_path / "trace.json")[0]["token_ids"] == recs[0]["token_ids"]


def test_torch_steered_monitor_moves_projection_along_the_vector(tiny):
    from tests.reference import hf_hidden

    vec = _vec(7, (5, 64))
    unit = vec.data[2] / np.linalg.norm(vec.data[2])
    st = Steer.single(2, unit, 8.0, positions="response")
    plain, steered = monitor(
        tiny,
        prompts=["hi"],
        vectors={"v": vec},
        layers=[2],
        steer=st,
        compare_unsteered=True,
        max_new_tokens=6,
        out_dir=None,
        live=False,
    )
    assert plain["settings"]["steer"] is None and steered["settings"]["steer"] is not None
    # Row 2 is the output of block 1, where the vector is added: the steered answer's tokens
    # sit exactly 8 further along it than the same tokens read without steering.
    p_ids = tiny.encode(steered["chat_prompt"])
    hs = hf_hidden(tiny.model, p_ids + steered["token_ids"])[2, len(p_ids) :]  # [T, hidden]
    got = np.array(steered["projections"])[:, 0, 0]
    np.testing.assert_allclose(got - hs @ unit, 8.0, atol=1e-3)


def test_torch_cli_monitor(llama_dir, tmp_path):
    from click.testing import CliRunner

    from pertoken import cli
    from pertoken.vectors import save_vector

    v = save_vector(_vec(3, (5, 64)), tmp_path / "trait.pt")
    res = CliRunner().invoke(
        cli.main,
        [
            "monitor",
            "-m",
            str(llama_dir),
            "--backend",
            "torch",
            "--vector",
            f"trait={v}",
            "--layers",
            "2,3",
            "--max-new-tokens",
            "5",
            "--out",
            str(tmp_path),
            "hello",
        ],
    )
    assert res.exit_code == 0, res.output
    rec = load_traces(tmp_path / "trace.json")[0]
    assert rec["settings"]["backend"] == "torch" and len(rec["tokens"]) == 5
    assert np.array(rec["projections"]).shape == (5, 1, 2)
    bad = save_vector(_vec(3, (9, 64)), tmp_path / "other.pt")
    res = CliRunner().invoke(
        cli.main, ["monitor", "-m", str(llama_dir), "--vector", str(bad), "--layers", "2", "hello"]
    )
    assert res.exit_code == 1 and "another model" in res.output


def test_torch_cli_monitor_adds_sae_features(llama_dir, tmp_path):
    from click.testing import CliRunner

    from pertoken import cli
    from pertoken.backends import load_backend
    from pertoken.sae.load import load_sae
    from pertoken.vectors import save_vector
    from tests.reference import hf_hidden
    from tests.synthetic_sae import sae_arrays, write_gemma_scope

    v = save_vector(_vec(3, (5, 64)), tmp_path / "trait.pt")
    sae_dir = write_gemma_scope(tmp_path / "layer_1" / "width_16k" / "l0", sae_arrays(64, 96))
    args = ["monitor", "-m", str(llama_dir), "--backend", "torch", "--vector", f"t={v}"]
    args += ["--max-new-tokens", "6", "--out", str(tmp_path), "--sae", str(sae_dir), "hello"]
    # Gemma Scope layer_1 reads row 2, which must be one of the monitored rows.
    res = CliRunner().invoke(cli.main, [*args, "--layers", "3"])
    assert res.exit_code == 1 and "add 2 to --layers" in res.output
    res = CliRunner().invoke(cli.main, [*args, "--layers", "2,3", "--sae-top", "3"])
    assert res.exit_code == 0, res.output
    rec = load_traces(tmp_path / "trace.json")[0]
    assert rec["settings"]["sae_layer"] == 2 and len(rec["features"]) == len(rec["tokens"])
    # The features are the SAE's strongest activations on each token's row-2 state.
    tiny = load_backend(str(llama_dir), "torch")
    p_ids = tiny.encode(rec["chat_prompt"])
    hs = hf_hidden(tiny.model, p_ids + rec["token_ids"])[2, len(p_ids) :]  # [T, hidden]
    acts = load_sae(str(sae_dir)).encode(hs)  # [T, d_sae]
    for feats, a in zip(rec["features"], acts):
        assert [f["id"] for f in feats] == [int(i) for i in np.argsort(-a)[:3] if a[i] > 0]
        np.testing.assert_allclose(
            [f["act"] for f in feats], np.sort(a)[::-1][: len(feats)], rtol=1e-3, atol=1e-4
        )
    assert any(feats for feats in rec["features"])
    assert "features" in (tmp_path / "trace.html").read_text()


def test_monitor_from_python_is_quiet_by_default(fake, vectors, capsys):
    rec = monitor(fake, prompts=["hi"], vectors=vectors, layers=[1], out_dir=None)[0]
    captured = capsys.readouterr()
    assert rec["tokens"] and captured.out == "" and captured.err == ""
