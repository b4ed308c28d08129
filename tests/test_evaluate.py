"""The steering sweep on a fake backend whose answers follow the steering coefficient."""

import csv
import json
from types import SimpleNamespace

import numpy as np
import pytest

from pertoken.errors import PertokenError
from pertoken.pipeline.options import Generation, JudgeSettings
from pertoken.pipeline.sweep.grid import evaluate, format_table, parse_coefs
from pertoken.pipeline.sweep.store import Sweep, answer_columns
from pertoken.vectors import PersonaVector

TRAIT = SimpleNamespace(name="bossy", eval_questions=["q one?", "q two?", "q three?"])


class FakeBackend:
    name, model_id, n_layers, hidden_size, dtype = "fake", "fake-model", 4, 8, "float32"

    def __init__(self):
        self.calls = []

    def chat_prompt(self, system, user):
        return f"[{system}] {user}"

    def generate(self, prompts, *, steer=None, **opts):
        steers = steer if isinstance(steer, list) else [steer] * len(prompts)
        self.calls.append((len(prompts), steers, opts))
        coefs = [0.0 if s is None else s.terms[0].coef for s in steers]
        words = ["bossy" if c > 0 else "meek" if c < 0 else "plain" for c in coefs]
        return [f"{w} answer to {p}" for w, p in zip(words, prompts)]


class FakeJudge:
    identity = None

    def __init__(self, fail=False):
        self.seen, self.fail = [], fail

    def judge_rows(self, rows):
        if self.fail:
            raise PertokenError("cannot reach the judge")
        self.seen += rows
        for r in rows:
            a = r["answer"]
            r["bossy"] = 90.0 if "bossy" in a else 10.0 if "meek" in a else 50.0
            r["coherence"] = 80.0
        return rows


def vector(layers=4, hidden=8):
    return PersonaVector(np.ones((layers + 1, hidden), np.float32))


def sweep(backend, out, judge, coefs=(-1, 0, 1), layers=(1, 3), op="add", **gen):
    spec = Sweep(TRAIT, vector(), list(layers), list(coefs), op=op)
    generation = Generation(**{"samples": 2} | gen)
    return evaluate(backend, spec, out_dir=out, judge=judge, generation=generation, progress=False)


def read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_sweep_writes_answers_summary_and_plot(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    result = sweep(backend, tmp_path, judge)
    header, rows = read(tmp_path / "answers.csv")
    assert header[:6] == ["layer", "coef", "question", "answer", "bossy", "coherence"]
    assert len(rows) == 2 * 3 * 3 * 2  # layers x coefs x questions x samples
    # the whole grid in one call; coef 0 is generated once and shared by both layers, with
    # no steer for its prompts
    assert len(backend.calls) == 1 and backend.calls[0][0] == (2 * 2 + 1) * 3 * 2
    assert sum(s is None for s in backend.calls[0][1]) == 3 * 2
    steered = [s for s in backend.calls[0][1] if s is not None]
    assert {(s.terms[0].row, s.terms[0].coef) for s in steered} == {
        (1, -1),
        (1, 1),
        (3, -1),
        (3, 1),
    }
    assert all(s.positions == "response" for s in steered)
    # n_per_question > 1 samples at temperature 1
    assert all(c[2]["temperature"] == 1.0 for c in backend.calls)
    means = {(s.layer, s.coef): s.trait for s in result.summary}
    assert means == {(L, c): {-1: 10.0, 0: 50.0, 1: 90.0}[c] for L in (1, 3) for c in (-1, 0, 1)}
    _, summary = read(tmp_path / "summary.csv")
    assert [(r["layer"], r["coef"], r["bossy"]) for r in summary][:3] == [
        ("1", "-1.0", "10.00"),
        ("1", "0.0", "50.00"),
        ("1", "1.0", "90.00"),
    ]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    table = format_table("bossy", result.summary)
    assert "90.00" in table and len(table.splitlines()) == 7


def test_rerun_resumes_without_regenerating_or_rejudging(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    sweep(backend, tmp_path, judge)
    n_calls, n_judged = len(backend.calls), len(judge.seen)
    again = sweep(backend, tmp_path, judge)
    assert again.generated == 0 and len(backend.calls) == n_calls and len(judge.seen) == n_judged
    more = sweep(backend, tmp_path, judge, coefs=(-1, 0, 1, 2))
    assert more.generated == 2 and len(backend.calls) == n_calls + 1  # both in one call
    assert len(judge.seen) == n_judged + 2 * 3 * 2
    assert {s.coef for s in more.summary} == {-1, 0, 1, 2}
    # a narrower rerun summarizes only the settings it asks for
    assert {s.coef for s in sweep(backend, tmp_path, judge, coefs=(1,)).summary} == {1}


def test_judge_failure_keeps_answers_and_rerun_judges_them(tmp_path):
    backend = FakeBackend()
    with pytest.raises(PertokenError, match="judge"):
        sweep(backend, tmp_path, FakeJudge(fail=True))
    _, rows = read(tmp_path / "answers.csv")
    assert len(rows) == 36 and all(r["bossy"] == "" for r in rows)
    judge = FakeJudge()
    result = sweep(backend, tmp_path, judge)
    assert result.generated == 0 and len(judge.seen) == 36
    assert all(s.trait is not None for s in result.summary)


def test_vector_from_another_model_is_a_clear_error(tmp_path):
    with pytest.raises(PertokenError, match=r"\[5, 8\].*another model"):
        evaluate(
            FakeBackend(),
            Sweep(TRAIT, vector(hidden=16), [1], [1]),
            out_dir=tmp_path,
            judge=FakeJudge(),
            progress=False,
        )


def test_layer_outside_the_model_is_a_clear_error(tmp_path):
    with pytest.raises(PertokenError, match="outside 1..4"):
        sweep(FakeBackend(), tmp_path, FakeJudge(), layers=[5])


def test_other_settings_in_the_same_folder_are_refused(tmp_path):
    sweep(FakeBackend(), tmp_path, FakeJudge())
    with pytest.raises(PertokenError, match="other settings.*max_new_tokens"):
        sweep(FakeBackend(), tmp_path, FakeJudge(), max_tokens=5)


def test_foreign_answers_csv_is_refused(tmp_path):
    (tmp_path / "answers.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(PertokenError, match="lacks the column"):
        sweep(FakeBackend(), tmp_path, FakeJudge())


def test_parse_coefs():
    assert parse_coefs("-2,-1.5,0, 2") == [-2.0, -1.5, 0.0, 2.0]
    with pytest.raises(PertokenError, match="coefs"):
        parse_coefs("1,x")
    assert answer_columns("t")[:6] == ["layer", "coef", "question", "answer", "t", "coherence"]


def test_cli_vector_from_another_model_is_one_line_error(tmp_path, llama_dir):
    from click.testing import CliRunner

    from pertoken.cli import main
    from pertoken.vectors import save_vector

    wrong = save_vector(PersonaVector(np.zeros((5, 32), np.float32)), tmp_path / "v.pt")
    args = ["eval", "--model", str(llama_dir), "--backend", "torch", "--trait", "paternalism",
            "--vector", str(wrong), "--layers", "2", "--out", str(tmp_path / "ev")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "error:" in result.output and "[5, 64]" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "ev" / "answers.csv").exists()
    bad = CliRunner().invoke(main, [*args, "--coefs", "1,x"])
    assert bad.exit_code == 1 and "could not read coefs" in bad.output


def test_every_setting_samples_each_question_from_the_same_seeds(tmp_path):
    backend = FakeBackend()
    sweep(backend, tmp_path, FakeJudge(), coefs=(-1, 1), batch_size=4, seed=7)
    # one call of 4 settings x 6 prompts (3 questions x 2 samples), 4 decoding at once
    assert [c[0] for c in backend.calls] == [4 * 6]
    assert all(c[2]["batch_size"] == 4 and "seed" not in c[2] for c in backend.calls)
    every = backend.calls[0][2]["seeds"]
    seeds = [every[k : k + 6] for k in range(0, 24, 6)]
    assert all(s == seeds[0] for s in seeds) and len(set(seeds[0])) == 6
    other = FakeBackend()
    sweep(other, tmp_path / "other", FakeJudge(), coefs=(-1, 1), batch_size=6, seed=7)
    assert other.calls[0][2]["seeds"] == every  # not a matter of batching
    sweep(other, tmp_path / "seed8", FakeJudge(), coefs=(-1, 1), seed=8)
    assert not set(other.calls[-1][2]["seeds"]) & set(seeds[0])


def test_all_scores_missing_still_writes_summary_and_plot(tmp_path):
    class Refuse(FakeJudge):
        def judge_rows(self, rows):
            for r in rows:
                r["bossy"], r["coherence"] = "", "50.0"
            return rows

    result = sweep(FakeBackend(), tmp_path, Refuse(), coefs=(0, 1))
    assert all(s.trait is None and s.missing == s.n == 6 for s in result.summary)
    assert all(s.coherence == 50.0 for s in result.summary)
    _, summary = read(tmp_path / "summary.csv")
    assert {r["bossy"] for r in summary} == {""}
    assert (tmp_path / "sweep.png").is_file()
    assert "-" in format_table("bossy", result.summary)


def test_cli_missing_api_key_is_an_error_before_generating(tmp_path, llama_dir, monkeypatch):
    from click.testing import CliRunner

    from pertoken.cli import main
    from pertoken.vectors import save_vector

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file to find
    v = save_vector(PersonaVector(np.ones((5, 64), np.float32)), tmp_path / "v.pt")
    args = ["eval", "--model", str(llama_dir), "--backend", "torch", "--trait", "paternalism",
            "--vector", str(v), "--layers", "2", "--out", str(tmp_path / "ev")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "OPENAI_API_KEY" in result.output
    assert not (tmp_path / "ev" / "answers.csv").exists()


def test_a_one_sided_judge_failure_is_judged_again(tmp_path):
    """A row whose trait score (or coherence) is missing goes back to the judge on rerun."""
    sweep(FakeBackend(), tmp_path, FakeJudge())
    header, rows = read(tmp_path / "answers.csv")
    rows[0]["bossy"], rows[1]["coherence"] = "", ""
    with open(tmp_path / "answers.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=header)
        w.writeheader()
        w.writerows(rows)
    judge = FakeJudge()
    result = sweep(FakeBackend(), tmp_path, judge)
    assert [r["answer"] for r in judge.seen] == [rows[0]["answer"], rows[1]["answer"]]
    _, again = read(tmp_path / "answers.csv")
    assert all(r["bossy"] and r["coherence"] for r in again)
    assert all(s.missing == 0 for s in result.summary)


def test_sweep_identity_includes_backend_and_dtype(tmp_path):
    sweep(FakeBackend(), tmp_path, FakeJudge())
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["backend"] == "fake" and saved["dtype"] == "float32"

    class Mlx(FakeBackend):
        name = "mlx"

    class Half(FakeBackend):
        dtype = "bfloat16"

    with pytest.raises(PertokenError, match="other settings \\(backend: 'fake' -> 'mlx'\\)"):
        sweep(Mlx(), tmp_path, FakeJudge())
    with pytest.raises(PertokenError, match="dtype: 'float32' -> 'bfloat16'"):
        sweep(Half(), tmp_path, FakeJudge())


def test_extraction_only_kit_is_refused_by_eval(tmp_path):
    kit = SimpleNamespace(name="bossy", eval_questions=[], source="bossy.json")
    with pytest.raises(PertokenError, match="bossy.json has no evaluation questions"):
        evaluate(FakeBackend(), Sweep(kit, vector(), [1], [1]), out_dir=tmp_path,
                 judge=FakeJudge(), progress=False)  # fmt: skip
    assert not (tmp_path / "answers.csv").exists()


def test_cli_eval_of_an_extraction_only_kit_says_how_to_add_questions(tmp_path):
    from click.testing import CliRunner

    from pertoken.cli import main
    from tests.small_kit import kit_dict

    kit = {k: v for k, v in kit_dict("evil").items() if k != "eval_questions"}
    (tmp_path / "evil.json").write_text(json.dumps(kit))
    args = ["eval", "--model", str(tmp_path / "not-loaded"), "--trait", str(tmp_path / "evil.json"),
            "--vector", str(tmp_path / "v.pt"), "--layers", "2",
            "--out", str(tmp_path / "ev")]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "has no evaluation questions: add an 'eval_questions' list" in result.output
    assert "trait_data_eval/evil.json" in result.output


def test_another_judge_or_rubric_judges_every_answer_again(tmp_path):
    """eval.json records the judge (model, server, rubric digests); scores by another judge
    are not mixed into the sweep."""
    from pertoken.pipeline.judge.judges import make_judge
    from tests.fake_openai import serve_fake_openai

    trait = SimpleNamespace(**vars(TRAIT), eval_prompt="{question} {answer}")
    with serve_fake_openai() as server:
        server.reply = lambda body, n: [("40", 1.0)]
        judge = make_judge(
            trait, JudgeSettings(judge_model="judge-x", base_url=server.url), progress=False
        )
        sweep(FakeBackend(), tmp_path, judge, coefs=(1,))
        saved = json.loads((tmp_path / "eval.json").read_text())["judge"]
        assert saved["judge_model"] == "judge-x" and saved["judge_base_url"] == server.url
        n = len(server.requests)
        sweep(FakeBackend(), tmp_path, judge, coefs=(1,))
        assert len(server.requests) == n  # same judge: nothing to do
        rubric = "Coherent? {question} {answer}"
        other = make_judge(
            trait, JudgeSettings("judge-x", server.url, coherence_prompt=rubric), progress=False
        )
        server.reply = lambda body, n: [("90", 1.0)]
        result = sweep(FakeBackend(), tmp_path, other, coefs=(1,))
    assert len(server.requests) == n + 3  # the trait scores are cached, coherence is new
    assert [s.coherence for s in result.summary] == [90.0, 90.0]
    saved = json.loads((tmp_path / "eval.json").read_text())["judge"]
    assert saved["rubric_sha256"]["coherence"] == other.identity["rubric_sha256"]["coherence"]


def test_model_sampler_is_used_and_is_part_of_the_sweep_identity(tmp_path):
    backend = FakeBackend()
    backend.generation_config = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
    sweep(backend, tmp_path, FakeJudge(), sampler="model")
    used = {(o["temperature"], o["top_p"], o["top_k"]) for _, _, o in backend.calls}
    assert used == {(0.7, 0.9, 50)}
    with pytest.raises(PertokenError, match="other settings.*temperature: 0.7 -> 1.0"):
        sweep(FakeBackend(), tmp_path, FakeJudge())
