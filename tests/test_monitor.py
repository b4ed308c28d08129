import io
import json

import numpy as np
import pytest

import pertoken.trace
from pertoken.backends.base import Steer
from pertoken.errors import PertokenError
from pertoken.pipeline.monitor import Monitoring, monitor
from pertoken.pipeline.options import Generation
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


def load_store(folder):
    """(tokens, items, settings) of the trace store a monitor run wrote."""
    return (*pertoken.trace.load(folder), pertoken.trace.read_settings(folder))


def item_tokens(tokens, item: int):
    return tokens[tokens["item"] == item]


def stored_projections(tokens, item, vectors, layers, kind="proj"):
    """[token][vector][layer] of one item, read from its columns."""
    rows = item_tokens(tokens, item)
    return np.stack([[rows[f"{kind}.{v}.L{r}"].to_numpy() for r in layers] for v in vectors]
                    ).transpose(2, 0, 1)  # fmt: skip


def assert_stored(tokens, items, recs):
    """The store holds each returned record: its tokens, ids and values, its label and mean."""
    assert items["item"].tolist() == list(range(len(recs)))
    for i, rec in enumerate(recs):
        rows = item_tokens(tokens, i)
        assert rows["token"].tolist() == rec["tokens"]
        assert rows["token_id"].tolist() == rec["token_ids"]
        assert items["label"][i] == rec["label"] and items["question"][i] == rec["prompt"]
        for kind, field in (("proj", "projections"), ("cos", "cos_sim")):
            got = stored_projections(tokens, i, rec["vectors"], rec["layers"], kind)
            np.testing.assert_allclose(got, rec[field], rtol=1e-5, atol=1e-5)
        for k, v in enumerate(rec["vectors"]):
            for j, r in enumerate(rec["layers"]):
                want = rec["mean"][k][j]
                assert items[f"mean.{v}.L{r}.answer"][i] == pytest.approx(want, rel=1e-5)


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
        generation=Generation(samples=1, max_tokens=12),
        how=Monitoring(out_dir=tmp_path, live=False),
    )
    tokens, items, settings = load_store(tmp_path)
    assert_stored(tokens, items, [rec])
    assert list(settings["vectors"]) == ["paternalism", "deception"] and settings["rows"] == [1, 3]
    assert items["question"][0] == "how are you" and settings["generation"]["system"] is None
    assert settings["model"] == fake.model_id and settings["generation"]["max_new_tokens"] == 12
    T = len(tokens)
    assert T == 12 and "".join(tokens["token"]) == rec["text"]
    chat = fake.chat_prompt(None, "how are you")
    # positions count from the chat's first token; the answer is the assistant's, turn 1
    assert tokens["pos"].tolist() == list(range(len(fake.encode(chat)), len(fake.encode(chat)) + T))
    assert set(tokens["role"]) == {"assistant"} and set(tokens["segment"]) == {"answer"}
    proj = stored_projections(tokens, 0, ["paternalism", "deception"], [1, 3])
    assert proj.shape == (T, 2, 2)
    for k, name in enumerate(["paternalism", "deception"]):
        for j, row in enumerate([1, 3]):
            v = vectors[name].data[row].astype(np.float64)
            h = per_token_hidden(fake, chat, tokens["token_id"].tolist(), row)
            want = h @ v / np.sqrt(v @ v)
            np.testing.assert_allclose(proj[:, k, j], want, rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(tokens[f"norm.L{row}"], np.linalg.norm(h, axis=-1),
                                       rtol=1e-4)  # fmt: skip
            whole = fake.summaries([chat], [rec["text"]]).response_avg[0, row] @ v
            mean = items[f"mean.{name}.L{row}.answer"][0]
            assert mean == pytest.approx(whole / np.sqrt(v @ v), rel=1e-5)
    assert (tmp_path / "trace.html").is_file()


def test_several_prompts_are_items_of_one_store(fake, vectors, tmp_path):
    recs = monitor(
        fake,
        prompts=["one", "two", "three"],
        vectors=vectors,
        layers=[2],
        generation=Generation(samples=1, max_tokens=5),
        how=Monitoring(system="be brief", out_dir=tmp_path, live=False),
    )
    tokens, items, settings = load_store(tmp_path)
    assert items["question"].tolist() == ["one", "two", "three"]
    assert settings["generation"]["system"] == "be brief"
    assert_stored(tokens, items, recs)
    assert [t["label"] for t in recs] == ["prompt 1", "prompt 2", "prompt 3"]


def test_compare_unsteered_adds_the_plain_answer_with_the_same_seed(fake, vectors, tmp_path):
    st = Steer.single(2, vectors["paternalism"].data[2], 4.0)
    recs = monitor(
        fake,
        prompts=["hello"],
        vectors=vectors,
        layers=[2],
        generation=Generation(samples=1, seed=3, max_tokens=10),
        how=Monitoring(steer=st, compare_unsteered=True, out_dir=tmp_path, live=False),
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
    kw = dict(prompts=["hi"], vectors=vectors, layers=[1], generation=Generation(max_tokens=8))
    rec = monitor(fake, **kw, how=Monitoring(out_dir=None, live=True, stream=tty))[0]
    monitor(fake, **kw, how=Monitoring(out_dir=None, live=True, stream=pipe))
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
        generation=Generation(samples=1, max_tokens=4),
        how=Monitoring(out_dir=tmp_path, live=False, on_trace=add),
    )
    assert len(rec["features"]) == len(rec["tokens"])
    tokens, _ = pertoken.trace.load(tmp_path)
    assert [list(f) for f in tokens["features"]] == rec["features"]
    assert tokens["features"][0][0]["id"] == 7


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
            generation=Generation(samples=1, max_tokens=4),
            how=Monitoring(out_dir=tmp_path, live=False, on_trace=stop_on_second),
        )
    assert pertoken.trace.load(tmp_path)[1]["question"].tolist() == ["one"]


def test_bad_vectors_and_layers_are_clear_errors(fake, tmp_path):
    kw = dict(prompts=["hi"], how=Monitoring(out_dir=tmp_path))
    with pytest.raises(PertokenError, match="another model"):
        monitor(fake, vectors={"x": _vec(0, (5, 32))}, layers=[1], **kw)
    with pytest.raises(PertokenError, match="outside 0..4"):
        monitor(fake, vectors={"x": _vec(0)}, layers=[9], **kw)
    zero = PersonaVector(np.zeros((5, 16), np.float32))
    with pytest.raises(PertokenError, match="all zeros"):
        monitor(fake, vectors={"x": zero}, layers=[1], **kw)
    assert not (tmp_path / "trace.json").exists()


def test_monitor_refuses_a_folder_holding_a_dataset_trace(fake, vectors, tmp_path):
    (tmp_path / "trace.json").write_text(json.dumps({"model": "m", "complete": True}))
    with pytest.raises(PertokenError, match="store of `pertoken trace`.*another --out"):
        monitor(fake, prompts=["hi"], vectors=vectors, layers=[1], how=Monitoring(out_dir=tmp_path))
    assert fake.calls == [] or all(c["kind"] != "trace" for c in fake.calls)
    kw = dict(prompts=["hi"], vectors=vectors, layers=[1], generation=Generation(max_tokens=3),
              how=Monitoring(out_dir=tmp_path / "m"))  # fmt: skip
    monitor(fake, **kw)
    monitor(fake, **kw | {"prompts": ["again"]})  # a monitor run replaces its own store
    assert pertoken.trace.load(tmp_path / "m")[1]["question"].tolist() == ["again"]


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
    tokens, items, settings = load_store(out)
    assert items["question"].tolist() == ["zero", "zero", "one", "one", "two", "two"]
    assert items["label"].tolist()[:2] == ["prompt 1 (unsteered)", "prompt 1 (steered)"]
    assert list(settings["vectors"]) == ["paternalism", "dec"]
    assert settings["vectors"]["paternalism"]["file"] == str(v1)
    assert settings["steer_files"] == ["pat.pt layer 2 coef 3"]
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
        generation=Generation(samples=1, max_tokens=8),
        how=Monitoring(out_dir=tmp_path, live=False),
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
    tokens, items = pertoken.trace.load(tmp_path)
    assert_stored(tokens, items, recs)


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
        generation=Generation(samples=1, max_tokens=6),
        how=Monitoring(steer=st, compare_unsteered=True, out_dir=None, live=False),
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
    tokens, items, settings = load_store(tmp_path)
    assert settings["backend"] == "torch" and len(tokens) == 5 and items["n_tokens"][0] == 5
    assert stored_projections(tokens, 0, ["trait"], [2, 3]).shape == (5, 1, 2)
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
    tokens, _, settings = load_store(tmp_path)
    features = [list(f) for f in tokens["features"]]
    assert settings["sae_layer"] == 2 and len(features) == len(tokens) > 0
    # The features are the SAE's strongest activations on each token's row-2 state.
    tiny = load_backend(str(llama_dir), "torch")
    p_ids = tiny.encode(tiny.chat_prompt(None, "hello"))
    assert tokens["pos"][0] == len(p_ids)
    hs = hf_hidden(tiny.model, p_ids + tokens["token_id"].tolist())[2, len(p_ids) :]  # [T, hidden]
    acts = load_sae(str(sae_dir)).encode(hs)  # [T, d_sae]
    for feats, a in zip(features, acts):
        assert [f["id"] for f in feats] == [int(i) for i in np.argsort(-a)[:3] if a[i] > 0]
        np.testing.assert_allclose(
            [f["act"] for f in feats], np.sort(a)[::-1][: len(feats)], rtol=1e-3, atol=1e-4
        )
    assert any(feats for feats in features)
    assert '"features"' in (tmp_path / "trace_page" / "items-00000.js").read_text()


def test_monitor_from_python_is_quiet_by_default(fake, vectors, capsys):
    rec = monitor(fake, prompts=["hi"], vectors=vectors, layers=[1], how=Monitoring(out_dir=None))[
        0
    ]
    captured = capsys.readouterr()
    assert rec["tokens"] and captured.out == "" and captured.err == ""
