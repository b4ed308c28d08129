"""Report card, probe vectors and the coefficient search on the tiny model with a real trait
(tests/semantic_model.py), through the CLI on the torch backend, judged by phrase bank.

The semantic end-to-end test steers at rows 2 and 3; vet has to suggest one of them, the probe
vector has to steer as the mean difference does, and `eval --coefs auto` has to beat the
unsteered score at acceptable coherence with fewer judged answers than a sweep.
"""

import csv
import json

import pytest

from tests import semantic_model as sm
from tests.bank_judge import BankJudge
from tests.cli_runner import pertoken_cli

pytestmark = pytest.mark.slow

JUDGE = "gpt-4.1-mini-2025-04-14"
GEN = ["--max-new-tokens", "24"]
STEER_ROWS = (2, 3)  # where tests/test_semantic_e2e.py steers


@pytest.fixture(scope="module")
def judge():
    with BankJudge() as j:
        yield j


@pytest.fixture(scope="module")
def cli(tmp_path_factory, judge):
    """Invoke `pertoken ...` in-process with a dummy key and a private judge cache."""
    with pertoken_cli(tmp_path_factory.mktemp("judge-cache")) as invoke:
        yield invoke


@pytest.fixture(scope="module")
def run(tmp_path_factory, judge, cli):
    """`pertoken run --method probe`: its vectors folder, CSVs and printed report."""
    root = tmp_path_factory.mktemp("run")
    model = sm.semantic_model_dir()
    kit = sm.write_kit(root / "kit")
    output = cli(
        "run", "--model", model, "--backend", "torch", "--trait", kit, "--out", root / "runs",
        "--n-per-question", 2, *GEN, "--base-url", judge.base_url, "--judge-model", JUDGE,
        "--method", "probe",
    )  # fmt: skip
    (vectors,) = (root / "runs").rglob("vectors")
    csvs = {p: vectors.parent / f"{sm.TRAIT}_{p}_instruct.csv" for p in ("pos", "neg")}
    return {
        "root": root,
        "model": model,
        "kit": kit,
        "vectors": vectors,
        "csvs": csvs,
        "output": output,
    }


def _report(path):
    return json.loads(path.read_text())


def test_vet_suggests_a_row_where_steering_works(run, cli):
    probe = _report(run["vectors"] / f"{sm.TRAIT}_report.json")  # run vets its probe vector
    assert probe["method"] == "probe" and "suggested layer" in run["output"]
    diff = run["vectors"] / f"{sm.TRAIT}_response_avg_diff.pt"
    out = run["root"] / "vet-diff"
    printed = cli(
        "vet", diff, "--model", run["model"], "--backend", "torch",
        "--pos", run["csvs"]["pos"], "--neg", run["csvs"]["neg"], "--out", out,
    )  # fmt: skip
    mean_diff = _report(out / f"{sm.TRAIT}_report.json")
    for report in (probe, mean_diff):
        row = report["suggested_row"]
        assert row in STEER_ROWS, report
        assert report["rows"][row]["auroc"] > 0.9
        held, train = report["split"]["held_out_questions"], report["split"]["train_questions"]
        assert held and train and not set(held) & set(train)
        assert not any("instruction text" in w for w in report["warnings"])
    assert f"suggested layer {mean_diff['suggested_row']}" in printed


def _same_answers_csv(run) -> str:
    """The negative CSV with the positive answers: only the prompts differ."""
    rows = {}
    for pol, path in run["csvs"].items():
        with open(path, newline="") as f:
            rows[pol] = list(csv.DictReader(f))
    answer = {(r["question_id"].replace("_pos_", "_neg_"), r["sample"]): r for r in rows["pos"]}
    for r in rows["neg"]:
        pos = answer[(r["question_id"], r["sample"])]
        r["answer"], r[sm.TRAIT], r["coherence"] = pos["answer"], "10", pos["coherence"]
    path = run["root"] / "same_neg.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows["neg"][0]))
        writer.writeheader()
        writer.writerows(rows["neg"])
    return path


def test_identical_answers_fire_the_instruction_text_warning(run, cli):
    neg, save = _same_answers_csv(run), run["root"] / "same"
    both = ["--pos", run["csvs"]["pos"], "--neg", neg]
    cli("extract", "--model", run["model"], "--backend", "torch", *both, "--trait", sm.TRAIT,
        "--save-dir", save)  # fmt: skip
    printed = cli("vet", save / f"{sm.TRAIT}_response_avg_diff.pt", "--model", run["model"],
                  "--backend", "torch", *both)  # fmt: skip
    report = _report(save / f"{sm.TRAIT}_report.json")
    assert report["rows"][0]["auroc"] == 0.5  # the answers' own tokens are the same
    assert any("carries the instruction text" in w for w in report["warnings"]), report
    assert "carries the instruction text" in printed


def _by_coef(out, layer: str) -> dict[float, float]:
    with open(out / "summary.csv", newline="") as f:
        return {
            float(r["coef"]): float(r[sm.TRAIT]) for r in csv.DictReader(f) if r["layer"] == layer
        }


def test_probe_vector_steers_the_trait(run, judge, cli):
    out = run["root"] / "eval-probe"
    cli(
        "eval", "--model", run["model"], "--backend", "torch", "--trait", run["kit"],
        "--vector", run["vectors"] / f"{sm.TRAIT}_response_avg_probe.pt", "--layers", "2,3",
        "--coefs", "-2,0,2", "--out", out, "--n-per-question", 8, *GEN,
        "--base-url", judge.base_url, "--judge-model", JUDGE,
    )  # fmt: skip
    for layer in ("2", "3"):
        by_coef = _by_coef(out, layer)
        assert by_coef[-2] < by_coef[0] < by_coef[2], (layer, by_coef)
        assert by_coef[2] - by_coef[-2] > 40, (layer, by_coef)


def test_auto_search_beats_unsteered_with_fewer_answers_than_a_sweep(run, judge, cli):
    out = run["root"] / "eval-auto"
    args = (
        "eval", "--model", run["model"], "--backend", "torch", "--trait", run["kit"],
        "--vector", run["vectors"] / f"{sm.TRAIT}_response_avg_diff.pt", "--layers", "2,3",
        "--coefs", "auto", "--min-coherence", 70, "--out", out, "--n-per-question", 8, *GEN,
        "--base-url", judge.base_url, "--judge-model", JUDGE,
    )  # fmt: skip
    before = len(judge.requests)
    printed = cli(*args)
    result = _report(out / "search.json")
    best, unsteered = result["best"], result["unsteered"]
    assert best["layer"] in STEER_ROWS and best["n"] == len(sm.EVAL_QUESTIONS) * 8
    assert best["trait"] > unsteered["trait"] + 10 and best["coherence"] >= 70
    assert result["answers"] < result["grid_answers"] == (1 + 4 * 2) * len(sm.EVAL_QUESTIONS) * 8
    assert len(judge.requests) - before <= 2 * result["answers"]
    assert (
        f"judged {result['answers']} answers" in printed and str(result["grid_answers"]) in printed
    )
    mid = len(judge.requests)
    assert "judged" in cli(*args) and len(judge.requests) == mid  # a rerun resumes from the files
