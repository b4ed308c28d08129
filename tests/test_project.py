import csv
import re

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken import cli
from pertoken.commands import options
from pertoken.errors import PertokenError
from pertoken.pipeline.project import column_names, pearson, project_csv
from pertoken.vectors import PersonaVector, save_vector
from tests.fake_backend import FakeBackend

CSV_OUT = re.compile(r"Pearson r\((\S+), evil\) = ([+-][\d.]+) over (\d+) rows")
HEADER = ["question", "prompt", "answer", "question_id", "evil", "coherence"]


@pytest.fixture
def fake():
    return FakeBackend(model_id="org/Fake-Chat-1B")


@pytest.fixture
def vec_file(tmp_path):
    data = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)
    return save_vector(PersonaVector(data), tmp_path / "evil_response_avg_diff.pt")


def _write(path, rows, header=HEADER):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _rows(fake, n=7):
    out = []
    for i in range(n):
        q = f"question {'abc'[i % 3]} {i}"
        chat = fake.chat_prompt(None, q)
        ans = fake.generate([chat], max_new_tokens=6 + i, temperature=1.0, seed=i)[0]
        out.append([q, chat, ans, f"evil_{i}", "" if i == 3 else str(10 * i), "90"])
    return out


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_column_names_follow_conventions():
    assert column_names("Qwen/Qwen2.5-7B-Instruct", "v/evil_response_avg_diff.pt", 20) == [
        "Qwen2.5-7B-Instruct_evil_response_avg_diff_proj_layer20",
        "Qwen2.5-7B-Instruct_evil_response_avg_diff_prompt_last_proj_layer20",
        "Qwen2.5-7B-Instruct_evil_response_avg_diff_cos_sim_layer20",
    ]
    assert column_names("/models/tiny-llama/", "x.pt", 1)[0] == "tiny-llama_x_proj_layer1"


def test_project_csv_adds_columns_equal_to_independent_projections(fake, vec_file, tmp_path):
    rows = _rows(fake)
    src = _write(tmp_path / "gen.csv", rows)
    res = project_csv(
        fake, src, vector_path=vec_file, layer=2, out_path=tmp_path / "o.csv", chunk_rows=3
    )
    out = _read(tmp_path / "o.csv")
    assert list(out[0])[:6] == HEADER and list(out[0])[6:] == res.columns
    assert _read(src)[0].keys() == set(HEADER)  # the input stays as it was
    v = np.random.default_rng(3).normal(size=(5, 16)).astype(np.float32)[2].astype(np.float64)
    for r in out:
        n = len(fake.encode(r["prompt"]))
        h = fake.hidden(fake.encode(r["prompt"]) + fake.encode(r["answer"]))[:, 2]  # [T, hidden]
        resp, last = h[n:].astype(np.float64).mean(0), h[n - 1].astype(np.float64)
        assert float(r[res.columns[0]]) == pytest.approx(resp @ v / np.linalg.norm(v), rel=1e-5)
        assert float(r[res.columns[1]]) == pytest.approx(last @ v / np.linalg.norm(v), rel=1e-5)
        cos = resp @ v / np.linalg.norm(v) / np.linalg.norm(resp)
        assert float(r[res.columns[2]]) == pytest.approx(cos, rel=1e-5)
    score = [float(r["evil"]) for r in out if r["evil"]]
    assert res.trait == "evil" and [c.column for c in res.correlations] == res.columns[:2]
    for c in res.correlations:  # the answer mean and the last prompt token (the paper's monitor)
        proj = [float(r[c.column]) for r in out if r["evil"]]
        assert c.n == 6 and c.r == pytest.approx(np.corrcoef(proj, score)[0, 1])


def test_project_in_place_replaces_its_own_columns(fake, vec_file, tmp_path):
    src = _write(tmp_path / "gen.csv", _rows(fake, 3))
    project_csv(fake, src, vector_path=vec_file, layer=1)
    first = _read(src)
    project_csv(fake, src, vector_path=vec_file, layer=1)
    assert _read(src) == first and len(first[0]) == 9


def test_no_trait_column_means_no_r(fake, vec_file, tmp_path):
    rows = [r[:4] for r in _rows(fake, 3)]
    res = project_csv(
        fake, _write(tmp_path / "g.csv", rows, HEADER[:4]), vector_path=vec_file, layer=1
    )
    assert res.trait is None and res.correlations == []


def test_pearson_skips_missing_and_constant():
    rows = [{"x": "1", "y": "2"}, {"x": "2", "y": ""}, {"x": "3", "y": "6"}, {"x": "4", "y": "8"}]
    p = pearson(rows, "x", "y")
    assert (p.r, p.n) == (pytest.approx(1.0), 3)
    p = pearson([{"x": "1", "y": "5"}, {"x": "2", "y": "5"}], "x", "y")
    assert (p.r, p.n, p.why) == (None, 2, "the score column is constant")
    # 12.9 seven times has a std of 2e-15, not 0: still constant
    p = pearson([{"x": str(i), "y": "12.9"} for i in range(7)], "x", "y")
    assert (p.r, p.why) == (None, "the score column is constant")
    p = pearson([{"x": "1", "y": str(i)} for i in range(3)], "x", "y")
    assert (p.r, p.why) == (None, "the projection is constant")


def test_bad_input_is_a_clear_error(fake, vec_file, tmp_path):
    with pytest.raises(PertokenError, match="does not exist"):
        project_csv(fake, tmp_path / "none.csv", vector_path=vec_file, layer=1)
    bad = _write(tmp_path / "b.csv", [["q", "p"]], ["question", "prompt"])
    with pytest.raises(PertokenError, match="no answer column"):
        project_csv(fake, bad, vector_path=vec_file, layer=1)
    other = save_vector(PersonaVector(np.ones((3, 16), np.float32)), tmp_path / "o.pt")
    with pytest.raises(PertokenError, match="another model"):
        project_csv(fake, bad, vector_path=other, layer=1)


def test_cli_project_prints_r(fake, vec_file, tmp_path, monkeypatch):
    monkeypatch.setattr(options, "load_model", lambda *a: fake)
    src = _write(tmp_path / "gen.csv", _rows(fake, 5))
    res = CliRunner().invoke(
        cli.main, ["project", str(src), "-m", "x", "--vector", str(vec_file), "--layer", "3"]
    )
    assert res.exit_code == 0, res.output
    out = CSV_OUT.findall(res.output)
    assert [c for c, _, _ in out] == [
        "Fake-Chat-1B_evil_response_avg_diff_proj_layer3",
        "Fake-Chat-1B_evil_response_avg_diff_prompt_last_proj_layer3",
    ]
    projected = _read(src)
    for col, r, n in out:
        scored = [row for row in projected if row["evil"]]
        want = np.corrcoef([float(x[col]) for x in scored], [float(x["evil"]) for x in scored])
        assert float(r) == pytest.approx(want[0, 1], abs=1e-4) and n == "4"


def test_cli_project_constant_score_says_r_is_undefined(fake, vec_file, tmp_path, monkeypatch):
    monkeypatch.setattr(options, "load_model", lambda *a: fake)
    rows = [r[:4] + ["12.9", "90"] for r in _rows(fake, 7)]
    src = _write(tmp_path / "gen.csv", rows)
    res = CliRunner().invoke(
        cli.main, ["project", str(src), "-m", "x", "--vector", str(vec_file), "--layer", "3"]
    )
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[1:] == ["Pearson r is undefined (the score column is constant)"]


# ---------------------------------------------------------------- the torch backend, tiny models
def test_torch_project_matches_reference_hidden_states(model_dir, tmp_path):
    from pertoken.backends import load_backend
    from tests.reference import reference_summaries

    tiny = load_backend(str(model_dir), "torch", dtype="float32", device="cpu")
    qs = ["What should I do about money?", "hi", "Explain rain"]
    chats = [tiny.chat_prompt("Be kind.", q) for q in qs]
    answers = tiny.generate(chats, max_new_tokens=6, temperature=0)
    rows = [
        [q, c, a, f"evil_{i}", str(30 * i), "80"]
        for i, (q, c, a) in enumerate(zip(qs, chats, answers, strict=True))
    ]
    data = np.random.default_rng(8).normal(size=(5, 64)).astype(np.float32)
    vec = save_vector(PersonaVector(data), tmp_path / "evil_response_avg_diff.pt")
    res = project_csv(tiny, _write(tmp_path / "g.csv", rows), vector_path=vec, layer=3)
    assert res.columns[0] == f"{model_dir.name}_evil_response_avg_diff_proj_layer3"
    v = data[3].astype(np.float64)
    for r in _read(res.out_path):
        _, last, resp = reference_summaries(tiny.model, tiny.tokenizer, r["prompt"], r["answer"])
        want = [
            resp[3] @ v / np.linalg.norm(v),
            last[3] @ v / np.linalg.norm(v),
            resp[3] @ v / np.linalg.norm(v) / np.linalg.norm(resp[3]),
        ]
        got = [float(r[c]) for c in res.columns]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert all(c.n == 3 and -1 <= c.r <= 1 for c in res.correlations)


def test_project_reads_eval_answers_templating_the_question(fake, vec_file, tmp_path):
    header = ["layer", "coef", "question", "answer", "evil", "coherence", "question_id", "sample"]
    gen = _rows(fake)
    evals = [["6", "2.0", q, a, score, "90", qid, "0"] for q, _, a, qid, score, _ in gen]
    res = project_csv(
        fake, _write(tmp_path / "answers.csv", evals, header), vector_path=vec_file, layer=2
    )
    same = project_csv(fake, _write(tmp_path / "gen.csv", gen), vector_path=vec_file, layer=2)
    # the question templated with no system prompt, as eval asked it: the same projections
    col = res.columns[0]
    assert [r[col] for r in _read(res.out_path)] == [r[col] for r in _read(same.out_path)]
    assert res.trait == "evil" and res.correlations[0].r is not None
