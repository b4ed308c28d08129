"""What long commands say before and while they work: the plan in the banner, a time estimate
once the first answers are in, an overall line for the coefficient search, and progress while
`trace` generates answers."""

import numpy as np
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.pipeline.generate import generate_csv
from pertoken.pipeline.options import Generation
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.traits import load_trait
from pertoken.vectors import PersonaVector, save_vector
from tests.fake_backend import FakeBackend
from tests.pipeline_fakes import RecordingBackend
from tests.small_kit import write_kit
from tests.test_coef_search import FakeBackend as SearchBackend
from tests.test_coef_search import FakeJudge, search


def test_the_run_banner_states_the_plan(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file to find
    kit = write_kit(tmp_path, "evil", n_questions=2, n_instructions=3)
    args = ["run", "--model", "org/model", "--trait", str(kit), "--out", str(tmp_path / "runs"),
            "--backend", "torch", "--max-new-tokens", "300"]  # fmt: skip
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1  # no judge key: stopped before any model work
    (plan,) = [x for x in r.output.splitlines() if x.startswith("plan")]
    assert "60 rows a side (2 questions x 3 instruction pairs x 10 samples)" in plan
    assert "up to 300 new tokens each" in plan


def test_generate_estimates_the_time_once_the_first_answers_are_in(tmp_path, capsys):
    kit = load_trait(write_kit(tmp_path, "evil", n_questions=3, n_instructions=2))
    out = tmp_path / "pos.csv"
    generate_csv(RecordingBackend(), kit, out, Generation(samples=2, batch_size=4))
    err = capsys.readouterr().err
    assert "generate pos: about" in err and "for 12 rows" in err
    assert "over the first 4 answers" in err and err.count("generate pos: about") == 1


def test_eval_prints_the_banner_with_its_plan(tmp_path):
    kit = write_kit(tmp_path, "evil", n_questions=2, n_instructions=1)
    n_eval = len(load_trait(kit).eval_questions)
    vec = save_vector(PersonaVector(np.ones((3, 4), np.float32)), tmp_path / "v.pt")
    base = ["eval", "--model", str(tmp_path / "not-a-model"), "--backend", "torch",
            "--trait", str(kit), "--vector", str(vec), "--layers", "1,2", "--judge-model",
            "local:x", "--n-per-question", "2", "--out", str(tmp_path / "ev")]  # fmt: skip
    r = CliRunner().invoke(main, [*base, "--coefs", "auto"])
    lines = r.output.splitlines()
    assert lines[0].startswith("model") and "output" in r.output
    (plan,) = [x for x in lines if x.startswith("plan")]
    assert "coefficient search over layers [1, 2]: at most" in plan
    r = CliRunner().invoke(main, [*base, "--coefs", "0,1,2"])
    (plan,) = [x for x in r.output.splitlines() if x.startswith("plan")]
    assert f"5 settings (layers x coefficients, and unsteered) x {n_eval} questions" in plan
    assert f"= {5 * n_eval * 2} answers" in plan


def test_the_coefficient_search_prints_an_overall_line(tmp_path, capsys):
    r = search(SearchBackend(), tmp_path, FakeJudge(), progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("search:")]
    most = int(lines[0].split("of at most ")[1].split()[0])
    assert lines[0].startswith("search: 16 of at most") and r.answers <= most
    assert lines[-1].startswith(f"search: {r.answers} of at most {most} answers judged")


def test_trace_of_prompts_shows_progress_while_generating(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\nthree\n")
    vec = PersonaVector(np.random.default_rng(0).normal(size=(5, 16)).astype(np.float32))
    trace_dataset(
        FakeBackend(),
        input=prompts,
        vectors={"pat": vec},
        rows=[2],
        out_dir=tmp_path / "out",
        tracing=Tracing(page=False),
    )
    err = capsys.readouterr().err
    assert "generate: " in err and "3/3" in err.split("generate: ")[-1]
