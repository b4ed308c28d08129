"""End to end through the CLI on a tiny model that has a real trait (tests/semantic_model.py).

`pertoken run` extracts a paternalism vector with a phrase-bank judge; the vector then has to
do what a persona vector is for: steering raises the judged trait score (`pertoken eval`),
trait answers project higher than anti-trait ones token by token (`pertoken monitor`), and the
projection correlates with the judged score over a dataset (`pertoken project`). Both backends.
"""

import csv
import re

import numpy as np
import pytest

import pertoken.trace
from pertoken.backends import is_installed
from pertoken.vectors import load_vector
from tests import semantic_model as sm
from tests.bank_judge import BankJudge
from tests.cli_runner import pertoken_cli

pytestmark = pytest.mark.slow

BACKENDS = [
    "torch",
    pytest.param("mlx", marks=pytest.mark.skipif(not is_installed("mlx"), reason="needs mlx")),
]
JUDGE = "gpt-4.1-mini-2025-04-14"
GEN = ["--max-new-tokens", "24"]


@pytest.fixture(scope="module")
def model_dir():
    return sm.semantic_model_dir()


@pytest.fixture(scope="module")
def judge():
    with BankJudge() as j:
        yield j


@pytest.fixture(scope="module")
def cli(tmp_path_factory, judge, model_dir):
    """Invoke `pertoken ...` in-process with a dummy key and a private judge cache."""
    with pertoken_cli(tmp_path_factory.mktemp("judge-cache")) as invoke:
        yield invoke


@pytest.fixture(scope="module", params=BACKENDS)
def run(request, tmp_path_factory, model_dir, judge, cli):
    """One `pertoken run` per backend: its folder, the vector file and the printed report."""
    backend = request.param
    root = tmp_path_factory.mktemp(f"run-{backend}")
    kit = sm.write_kit(root / "kit")
    output = cli(
        "run", "--model", model_dir, "--backend", backend, "--trait", kit, "--out", root / "runs",
        "--n-per-question", 2, *GEN, "--base-url", judge.base_url, "--judge-model", JUDGE,
    )  # fmt: skip
    vectors = list((root / "runs").rglob(f"{sm.TRAIT}_response_avg_diff.pt"))
    assert len(vectors) == 1, output
    return {"backend": backend, "root": root, "kit": kit, "vector": vectors[0], "output": output}


def test_run_extracts_a_vector_through_the_judge(run, judge, model_dir):
    v = load_vector(run["vector"])
    assert v.data.shape == (sm.RECIPE["layers"] + 1, sm.RECIPE["hidden"])
    assert np.all(np.isfinite(v.data)) and np.linalg.norm(v.data[2]) > 0
    kept, total = map(int, re.search(r"pairs kept: (\d+) of (\d+)", run["output"]).groups())
    assert total == len(sm.EXTRACT_QUESTIONS) * len(sm.INSTRUCTIONS) * 2
    assert kept >= 0.8 * total  # the trained model keeps to its banks under both prompts
    # every judge call has docs/CONVENTIONS.md's shape
    for body in judge.requests:
        assert body["model"] == JUDGE and len(body["messages"]) == 1
        assert body["messages"][0]["role"] == "user"
        assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["seed"] == 0
        assert body["logprobs"] is True and body["top_logprobs"] == 20


def _table(output: str) -> list[str]:
    # progress bars on stderr share the line before the table in the captured output
    assert "layer    coef" in output, output
    return output[output.rindex("layer    coef") :].splitlines()[:7]


def test_eval_trait_score_rises_with_the_coefficient(run, judge, model_dir, cli):
    out = run["root"] / "eval"
    args = (
        "eval", "--model", model_dir, "--backend", run["backend"], "--trait", run["kit"],
        "--vector", run["vector"], "--layers", "2,3", "--coefs", "-2,0,2", "--out", out,
        "--n-per-question", 8, *GEN, "--base-url", judge.base_url, "--judge-model", JUDGE,
    )  # fmt: skip
    before = len(judge.requests)
    printed = cli(*args)
    # coef 0 is shared by the layers: 5 settings of 4 x 8 answers, two judge calls per answer
    # (identical answers are judged once; both backends draw each prompt's sample from the same
    # per-prompt seed, so the second backend's answers may all be in the shared cache already)
    assert len(judge.requests) - before <= 5 * 32 * 2
    mid = len(judge.requests)
    assert _table(cli(*args)) == _table(printed)  # the same summary again
    assert len(judge.requests) == mid  # a rerun generates nothing and judges from the cache
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert len(summary) == 6
    for layer in ("2", "3"):
        by_coef = {float(r["coef"]): float(r[sm.TRAIT]) for r in summary if r["layer"] == layer}
        assert by_coef[-2] < by_coef[0] < by_coef[2], (layer, by_coef, printed)
        assert by_coef[2] - by_coef[-2] > 40, (layer, by_coef)
    with open(out / "answers.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:6] == [
            "layer",
            "coef",
            "question",
            "answer",
            sm.TRAIT,
            "coherence",
        ]
        answers = list(reader)
        assert len(answers) == 6 * len(sm.EVAL_QUESTIONS) * 8
        assert all(r[sm.TRAIT] and r["coherence"] for r in answers)  # every answer was judged
    assert (out / "sweep.png").stat().st_size > 1000
    assert "coherence" in printed and sm.TRAIT in printed


def _monitor_means(cli, run, model_dir, polarity: str) -> np.ndarray:
    out = run["root"] / f"monitor-{polarity}"
    prompts = out.parent / "prompts.txt"
    prompts.write_text("\n".join(q for q, _ in sm.EVAL_QUESTIONS) + "\n")
    cli(
        "monitor", "--model", model_dir, "--backend", run["backend"],
        "--vector", f"{sm.TRAIT}={run['vector']}", "--layers", "2,3",
        "--system", sm.system_prompt(polarity, 0), "--prompts", prompts, "--out", out, *GEN,
    )  # fmt: skip
    tokens, items = pertoken.trace.load(out)  # a monitor run is a trace store, an item an answer
    assert len(items) == len(sm.EVAL_QUESTIONS)
    per_item = [tokens[tokens["item"] == i] for i in items["item"]]
    answers = ["".join(t["token"]) for t in per_item]
    side = sm.TRAIT_BANK if polarity == "pos" else sm.ANTI_BANK
    assert all(any(p in a for p in side) for a in answers), answers
    cols = [f"proj.{sm.TRAIT}.L2", f"proj.{sm.TRAIT}.L3"]
    return np.array([t[cols].to_numpy().mean(0) for t in per_item])  # [n, 2]


def test_monitor_trait_answers_project_higher(run, model_dir, cli):
    pos = _monitor_means(cli, run, model_dir, "pos")
    neg = _monitor_means(cli, run, model_dir, "neg")
    assert np.all(pos.mean(0) > neg.mean(0)), (pos, neg)
    assert pos[:, 1].min() > neg[:, 1].max()  # at row 3 every trait answer is above every other


def test_project_correlates_with_the_judged_score(run, model_dir, cli):
    csvs = sorted(run["vector"].parent.parent.glob(f"{sm.TRAIT}_*_instruct.csv"))
    assert len(csvs) == 2
    rows, header = [], None
    for path in csvs:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            rows += list(reader)
    both = run["root"] / "both.csv"
    with open(both, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    out = run["root"] / "projected.csv"
    printed = cli(
        "project", both, "--model", model_dir, "--backend", run["backend"],
        "--vector", run["vector"], "--layer", 3, "--out", out,
    )  # fmt: skip
    r = float(re.search(r"Pearson r\(.*\) = ([+-][\d.]+)", printed).group(1))
    assert r > 0.5, printed
    with open(out, newline="") as f:
        projected = list(csv.DictReader(f))
    assert len(projected) == len(rows)
    assert any(c.endswith("_proj_layer3") for c in projected[0])


def test_trace_stats_find_the_trait_in_the_answer(run, model_dir, cli):
    # the judged extraction CSVs of `pertoken run`, traced token by token
    rows, header = [], None
    for path in sorted(run["vector"].parent.parent.glob(f"{sm.TRAIT}_*_instruct.csv")):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, rows + list(reader)
    judged = run["root"] / "judged.csv"
    with open(judged, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    out = run["root"] / "trace"
    cli(
        "trace", "--model", model_dir, "--backend", run["backend"], "--input", judged,
        "--vector", f"{sm.TRAIT}={run['vector']}", "--layers", "2,3", "--out", out, "--no-page",
    )  # fmt: skip
    printed = cli("trace-stats", out)
    assert f"r with {sm.TRAIT} (Pearson/Spearman)" in printed
    with open(out / "stats" / "correlations.csv", newline="") as f:
        table = list(csv.DictReader(f))
    (answer,) = [
        r for r in table
        if (r["stat"], r["layer"], r["segment"], r["score"]) == ("mean", "3", "answer", sm.TRAIT)
    ]  # fmt: skip
    assert int(answer["n"]) == len(rows) and float(answer["pearson"]) > 0.5, answer
    assert float(answer["spearman"]) > 0.5
