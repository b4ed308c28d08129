"""trace-stats on a store traced with the fake backend, checked against the token table."""

import csv

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from scipy import stats

import pertoken.trace
from pertoken import cli
from pertoken.errors import PertokenError
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.pipeline.trace.stats import trace_stats
from pertoken.vectors import PersonaVector
from tests.fake_backend import FakeBackend

WORDS = "the cat sat on a mat and then it <think>ran off</think> far away to sleep".split()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    fake, rng = FakeBackend(), np.random.default_rng(0)
    path = tmp / "gen.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "prompt", "answer", "question_id", "evil", "coherence", "sample"])
        for i in range(12):
            answer = " ".join(rng.choice(WORDS[:9], size=4 + i)) + (" <think>x</think>" * (i % 2))
            w.writerow([f"q{i}", fake.chat_prompt(None, f"q{i}"), answer, f"e_{i}", 7 * i % 50,
                        90 - i, 0])  # fmt: skip
    vec = PersonaVector(rng.normal(size=(5, 16)).astype(np.float32))
    trace_dataset(
        fake,
        input=path,
        vectors={"pat": vec},
        rows=[2, 4],
        out_dir=tmp / "out",
        tracing=Tracing(page=False, progress=False),
    )
    return tmp / "out"


def _answers(tokens: pd.DataFrame, item: int) -> pd.DataFrame:
    rows = tokens[(tokens["item"] == item) & (tokens["role"] == "assistant")]
    return rows[rows["segment"] != "template"]


def test_correlations_match_the_token_table(store, tmp_path):
    res = trace_stats(store, out_dir=tmp_path)
    assert res.scores == ["evil", "coherence"]  # numeric metadata, not the sample counter
    tokens, items = pertoken.trace.load(store)
    means = tokens[tokens["segment"] == "answer"].groupby("item")["proj.pat.L4"].mean()
    want = np.corrcoef(means.to_numpy(), items["evil"].to_numpy())[0, 1]
    (row,) = [r for r in res.correlations if (r["stat"], r["layer"], r["segment"], r["score"])
              == ("mean", 4, "answer", "evil")]  # fmt: skip
    assert row["pearson"] == pytest.approx(want, rel=1e-5) and row["n"] == 12
    assert row["spearman"] == pytest.approx(stats.spearmanr(means, items["evil"])[0], rel=1e-5)
    thinking = [r for r in res.correlations if r["segment"] == "thinking" and r["stat"] == "max"]
    assert all(r["n"] == 6 for r in thinking)  # only the odd items have a thinking span
    template = [r for r in res.correlations if r["segment"] == "template"]
    assert all(r["n"] == 0 and r["pearson"] is None for r in template)  # CSV items: none
    for name in ("correlations.csv", "curves.csv", "spans.csv"):
        assert (tmp_path / name).stat().st_size > 100
    for name in ("correlations.png", "curves.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_decile_curves_per_tercile(store):
    res = trace_stats(store, scores=["coherence"])
    tokens, items = pertoken.trace.load(store)
    lo, hi = np.quantile(items["coherence"], [1 / 3, 2 / 3])
    high = items[items["coherence"] > hi]["item"].tolist()
    per_item = []
    for item in high:
        vals = _answers(tokens, item)["proj.pat.L2"].to_numpy()
        bins = np.arange(len(vals)) * 10 // len(vals)
        per_item.append(
            [vals[bins == d].mean() if (bins == d).any() else np.nan for d in range(10)]
        )
    want = np.nanmean(per_item, axis=0)
    got = [r["mean"] for r in res.curves if (r["tercile"], r["layer"]) == ("high", 2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert {r["items"] for r in res.curves if r["tercile"] == "high"} == {len(high)}
    assert (store / "stats" / "curves.png").is_file()


def test_top_spans_are_the_extreme_windows(store):
    res = trace_stats(store, span=3, top=4)
    tokens, _ = pertoken.trace.load(store)
    best = {}  # item -> (max window mean, start, text)
    for item in range(12):
        ans = _answers(tokens, item)
        vals, pos, text = (
            ans["proj.pat.L4"].to_numpy(),
            ans["pos"].to_numpy(),
            ans["token"].tolist(),
        )
        wins = [(vals[i : i + 3].mean(), pos[i], "".join(text[i : i + 3]))
                for i in range(len(vals) - 2)]  # fmt: skip
        best[item] = max(wins)
    high = [s for s in res.spans if (s["layer"], s["kind"]) == (4, "high")]
    assert len(high) == 4 and [s["rank"] for s in high] == [1, 2, 3, 4]
    want = sorted(best.items(), key=lambda kv: -kv[1][0])[:4]
    for s, (item, (mean, start, text)) in zip(high, want):
        assert (s["item"], s["pos"], s["text"]) == (item, start, text)
        assert s["mean"] == pytest.approx(mean, rel=1e-5)
    low = [s for s in res.spans if (s["layer"], s["kind"]) == (4, "low")]
    assert low[0]["mean"] <= min(s["mean"] for s in high) and low[0]["mean"] <= low[1]["mean"]


def test_cli_prints_the_tables_and_bad_scores_are_clear(store):
    res = CliRunner().invoke(cli.main, ["trace-stats", str(store), "--span", "4"])
    assert res.exit_code == 0, res.output
    assert (
        "r with evil (Pearson/Spearman)" in res.output and "top spans (pat, layer 2)" in res.output
    )
    res = CliRunner().invoke(cli.main, ["trace-stats", str(store), "--score", "nope"])
    assert res.exit_code == 1 and "has no score column 'nope'" in res.output
    with pytest.raises(PertokenError, match="not a trace store"):
        trace_stats(store / "stats")
