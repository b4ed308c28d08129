"""The one judge factory: rows judged in memory, a local judge made only when needed and
reusing the model already loaded."""

import pytest

import pertoken.backends
from pertoken.errors import PertokenError
from pertoken.pipeline.judge.judges import make_judge
from pertoken.pipeline.options import JudgeSettings, ModelChoice
from pertoken.traits import load_trait
from tests.small_kit import write_kit
from tests.test_judge_local import WholeNumbers

EXPECTED = pytest.approx(0.6 * 42 + 0.4 * 90, rel=1e-5)  # WholeNumbers' score


def rows(*answers):
    return [{"question": "What now?", "answer": a} for a in answers]


@pytest.fixture
def kit(tmp_path):
    return load_trait(write_kit(tmp_path, "evil"))


@pytest.fixture
def no_loading(monkeypatch):
    def load(*args, **kw):
        raise AssertionError("the judge loaded a model")

    monkeypatch.setattr(pertoken.backends, "load_backend", load)


def test_local_judge_of_the_loaded_model_reuses_it(kit, tmp_path, no_loading):
    loads = []
    model = WholeNumbers()

    def backend():
        loads.append(1)
        return model

    judge = make_judge(
        kit,
        JudgeSettings(judge_model="local:m", cache=tmp_path / "c.sqlite"),
        backend=backend,
        progress=False,
        model=ModelChoice("m"),
    )
    got = judge.judge_rows(rows("a", "b"))
    assert [(float(r["evil"]), float(r["coherence"])) for r in got] == [(EXPECTED, EXPECTED)] * 2
    t = judge.tally(rows("c"))
    none = {"evil": 0, "coherence": 0}
    assert (t.requests, t.cached, t.refused, t.failed) == (2, 0, none, none)
    assert loads == [1]  # made once, on the first rows that needed it
    assert judge.identity["judge_base_url"] == "local"


def test_the_scorer_is_made_only_when_a_score_is_not_cached(kit, tmp_path, no_loading):
    cache = tmp_path / "c.sqlite"
    make_judge(
        kit,
        JudgeSettings(judge_model="local:m", cache=cache),
        backend=WholeNumbers,
        progress=False,
        model=ModelChoice("m"),
    ).judge_rows(rows("a"))

    def broken():
        raise PertokenError("the judge's model cannot load")

    judge = make_judge(
        kit,
        JudgeSettings(judge_model="local:m", cache=cache),
        backend=broken,
        progress=False,
        model=ModelChoice("m"),
    )
    t = judge.tally(rows("a"))
    assert t.requests == 0 and t.cached == 2
    with pytest.raises(PertokenError, match="cannot load"):
        judge.judge_rows(rows("new"))


def test_a_local_judge_of_another_model_loads_it(kit, tmp_path, monkeypatch):
    loaded = []

    def load(model, backend_name, **kw):
        loaded.append((model, backend_name))
        return WholeNumbers()

    monkeypatch.setattr(pertoken.backends, "load_backend", load)
    judge = make_judge(
        kit,
        JudgeSettings(judge_model="local:other", cache=tmp_path / "c.sqlite"),
        backend=WholeNumbers,
        progress=False,
        model=ModelChoice("m", "torch"),
    )
    assert float(judge.judge_rows(rows("a"))[0]["evil"]) == EXPECTED
    assert loaded == [("other", "torch")]


def test_an_api_judge_without_a_key_stops_at_the_check(kit, monkeypatch, tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.chdir(tmp_path)  # no .env file to find
    judge = make_judge(kit, JudgeSettings(judge_model="judge-x"))
    with pytest.raises(PertokenError, match="no OPENAI_API_KEY"):
        judge.check(reach=False)
    make_judge(kit, JudgeSettings("local:m")).check()  # a local judge is checked when it loads


def test_scores_are_written_rounded():
    from pertoken.pipeline.csvio import format_score

    assert format_score(3.157838e-15) == "0.0"  # the judge formula when all mass is on "0"
    assert format_score(-1e-12) == "0.0"
    assert format_score(73.253712345) == "73.2537"
    assert format_score(None) == "" and format_score(float("nan")) == ""
