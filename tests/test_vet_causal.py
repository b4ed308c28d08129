"""The report card's causal columns: teacher-forced gain and cost per row, and the suggestion."""

import json

import numpy as np
import pytest

from pertoken.pipeline.vet.card import load_report
from pertoken.pipeline.vet.causal import (
    LOOP_MARGIN,
    MIN_ANSWERS,
    Causal,
    answer_logprob,
    distinct_share,
    free_run,
    sound,
    suggest,
)
from pertoken.pipeline.vet.stage import CausalCheck, vet_vector
from tests.pipeline_fakes import RecordingBackend
from tests.test_vet import make_run


class ScoringBackend(RecordingBackend):
    """The fake with logits over its whole vocabulary, so answers can be teacher-forced."""

    def __init__(self):
        super().__init__()
        rng = np.random.default_rng(1)
        self.full_unembed = rng.normal(size=self.embed.shape).astype(np.float32)  # [V, hidden]

    def logits(self, text, *, steer=None, prompt_len=None):
        h = self.hidden(self.encode(text), steer=steer, prompt_len=prompt_len)
        return (h[:, -1] @ self.full_unembed.T).astype(np.float32)  # [T, V]


MEASURES = ("gain", "cost", "trait_cost", "distinct")


def _causal(gain, cost, trait_cost=None, distinct=None, distinct0=None):
    return Causal(gain, cost, 2, 2, 8, trait_cost, distinct, distinct0)


def test_suggestion_is_the_largest_gain_within_the_trait_cost_bound():
    gain = {2: {"0.5": 0.4, "1": 2.0}, 3: {"0.5": 0.9, "1": 1.5}}
    trait_cost = {2: {"0.5": 0.1, "1": 3.0}, 3: {"0.5": 0.2, "1": 0.6}}
    own = {2: {"0.5": 9.0, "1": 9.0}, 3: {"0.5": 9.0, "1": 9.0}}  # confounded: not a bound
    assert suggest(_causal(gain, own, trait_cost), max_cost=0.5) == (3, "0.5", True)
    assert suggest(_causal(gain, own, trait_cost), max_cost=1.0) == (3, "1", True)
    # nothing within the bound: the least trait cost, flagged
    assert suggest(_causal(gain, own, trait_cost), max_cost=0.05) == (2, "0.5", False)
    # a card without the trait cost falls back on the own-answer cost
    assert suggest(_causal(gain, trait_cost), max_cost=0.5) == (3, "0.5", True)


def test_a_gain_that_comes_with_loops_or_trait_cost_is_not_chosen():
    # row 5 moves the trait most but its greedy answers loop; row 11 next, but it costs the
    # trait answers themselves; row 8 gains less, cleanly. Every own cost is large, as for a
    # language, where the model's own answers are the trait's opposite.
    gain = {5: {"0.5": 5.0}, 8: {"0.5": 2.0}, 11: {"0.5": 4.0}}
    own = {5: {"0.5": 5.2}, 8: {"0.5": 2.6}, 11: {"0.5": 4.5}}
    trait_cost = {5: {"0.5": 0.1}, 8: {"0.5": 0.2}, 11: {"0.5": 1.5}}
    distinct = {5: {"0.5": 0.3}, 8: {"0.5": 0.85}, 11: {"0.5": 0.9}}
    assert suggest(_causal(gain, own, trait_cost, distinct, 0.9)) == (8, "0.5", True)
    assert suggest(_causal(gain, own, trait_cost)) == (5, "0.5", True)  # no loop check: row 5
    # the loop bound is half the unsteered answers' share: prose that repeats itself as much
    # as the unsteered answers do is no loop
    assert suggest(_causal(gain, own, trait_cost, distinct, 0.5)) == (5, "0.5", True)
    # every setting loops or costs: the least trait cost, flagged
    distinct[8]["0.5"] = 0.2
    assert suggest(_causal(gain, own, trait_cost, distinct, 0.9)) == (5, "0.5", False)


def test_distinct_share_tells_a_loop_from_prose():
    assert distinct_share(list(range(20))) == 1.0
    assert distinct_share([7, 8] * 10) == pytest.approx(2 / 18)  # "la la la"
    assert distinct_share([1, 2]) == 0.0  # too short to hold a trigram


class LoopingBackend:
    """Greedy answers that loop when a steer's coefficient exceeds 1, prose otherwise."""

    def __init__(self):
        self.calls = []

    def encode(self, text):
        return [int(w) for w in text.split()]

    def generate(self, prompts, *, max_new_tokens, temperature, steer):
        self.calls.append((prompts, steer, max_new_tokens))
        loops = [s is not None and s.terms[0].coef > 1 for s in steer]
        return [" ".join(["5 6"] * 8 if bad else map(str, range(16))) for bad in loops]


def test_free_run_checks_bounded_settings_at_a_margin_in_one_call():
    gain = {2: {"0.5": 1.0, "1": 2.0}, 3: {"0.5": 1.0, "1": -1.0}}
    trait_cost = {2: {"0.5": 0.1, "1": 0.2}, 3: {"0.5": 0.9, "1": 0.1}}
    c = _causal(gain, trait_cost, trait_cost)
    coefs = {"0.5": [None, None, 0.7, 0.9], "1": [None, None, 1.4, 1.8]}
    fake = LoopingBackend()
    free_run(fake, np.ones((4, 3)), c, coefs, ["q1", "q2"], max_cost=0.5, max_tokens=40)
    ((prompts, steers, tokens),) = fake.calls
    assert prompts == ["q1", "q2"] * 3 and tokens == 40
    # unsteered, then the settings of positive gain within the bound, each LOOP_MARGIN harder
    assert steers[:2] == [None, None]
    assert [(s.terms[0].row, s.terms[0].coef) for s in steers[2::2]] == [
        (2, pytest.approx(0.7 * LOOP_MARGIN)),
        (2, pytest.approx(1.4 * LOOP_MARGIN)),
    ]
    assert c.distinct0 == 1.0 and c.distinct == {2: {"0.5": 1.0, "1": pytest.approx(2 / 14)}}
    assert suggest(c) == (2, "0.5", True)  # ratio 1 gains more but loops


def test_answer_logprob_is_the_mean_log_softmax_of_the_answer_tokens():
    fake = ScoringBackend()
    prompt, answer = "Q: hi ", "there you go"
    ids = fake.encode(prompt + answer)
    n = len(fake.encode(prompt))
    logits = np.asarray(fake.logits(prompt + answer), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = np.mean([logp[t, ids[t + 1]] for t in range(n - 1, len(ids) - 1)])
    assert answer_logprob(fake, prompt, answer, None) == pytest.approx(want, rel=1e-6)


def test_vet_causal_columns_in_json_md_and_the_suggestion(tmp_path):
    fake, csvs, paths = make_run(tmp_path, backend=ScoringBackend())
    r = vet_vector(
        paths["response_avg"], pos_csv=csvs["pos"], neg_csv=csvs["neg"], backend=fake,
        causal=CausalCheck(),
    )  # fmt: skip
    steerable = [row.row for row in r.rows if row.gain is not None]
    assert steerable == [2, 3]  # all rows but 0, 1 and the last
    assert r.suggested_ratio in ("0.25", "0.5", "1") and r.suggested_row in steerable
    row = r.row(r.suggested_row)
    assert r.suggested_coef == row.coef[r.suggested_ratio]
    settings = [(x.row, k) for x in r.rows if x.gain for k in x.gain]
    cards = {x.row: x for x in r.rows if x.gain}
    measures = ({n: getattr(x, m) for n, x in cards.items()} for m in MEASURES)
    c = _causal(*measures, r.causal["distinct_unsteered"])
    bounded = [s for s in settings if sound(c, *s, r.causal["max_cost"])]
    if bounded:  # the suggestion is the best gain among the sound settings
        best = max(r.row(a).gain[k] for a, k in bounded)
        assert row.gain[r.suggested_ratio] == best
    # the fake's vector moves its logits: steering changes both measures
    assert any(abs(g) > 1e-6 for x in r.rows if x.gain for g in x.gain.values())
    data = json.loads((tmp_path / "v" / "evil_report.json").read_text())
    assert data["rows"][2]["gain"] and data["causal"]["pairs"] >= 2
    # every setting has its trait cost; the loop check ran on the bounded ones of positive gain
    assert set(data["rows"][2]["trait_cost"]) == set(data["rows"][2]["gain"])
    checked = {(x.row, k) for x in r.rows if x.distinct for k in x.distinct}
    assert checked == {(x.row, k) for x in r.rows if x.gain for k in x.gain
                       if x.gain[k] > 0 and x.trait_cost[k] <= r.causal["max_cost"]}  # fmt: skip
    assert data["causal"]["loop_margin"] == LOOP_MARGIN and data["causal"]["distinct_unsteered"]
    assert data["causal"]["suggestion"]["row"] == r.suggested_row
    assert load_report(tmp_path / "v" / "evil_report.json").suggested_coef == r.suggested_coef
    md = (tmp_path / "v" / "evil_report.md").read_text()
    assert "What steering does" in md and "| 2 |" in md.split("What steering does")[1]
    assert "trait cost @0.5" in md and "distinct @0.5" in md and "Loop check" in md
    assert (tmp_path / "v" / "evil_report.png").stat().st_size > 0


class LengthJudge:
    """Trait = answer length mod 100; coherence 80."""

    identity = None

    def judge_rows(self, rows):
        for r in rows:
            r["evil"], r["coherence"] = repr(float(len(r["answer"]) % 100)), "80.0"
        return rows


def test_judged_check_answers_top_settings_and_unsteered_in_one_call(tmp_path):
    fake, csvs, paths = make_run(tmp_path, backend=ScoringBackend())
    calls = len(fake.generate_calls)
    r = vet_vector(
        paths["response_avg"], pos_csv=csvs["pos"], neg_csv=csvs["neg"], backend=fake,
        causal=CausalCheck(judged=2, judge=LengthJudge()),
    )  # fmt: skip
    # one generate call each: the own answers, the loop check, the judged check
    assert len(fake.generate_calls) == calls + 3
    # the two rows of best sound gain at each of the three coefficients
    assert r.judged[0]["row"] is None and len(r.judged) == 1 + 2 * 3
    # held-out questions and then training ones, up to MIN_ANSWERS (the kit has only 4)
    assert all(j["n"] == min(4, MIN_ANSWERS) and j["coherence"] == 80.0 for j in r.judged)
    steered = r.judged[1:]
    assert len({j["row"] for j in steered}) == 2
    # every setting kept coherence: the suggestion is the highest judged trait
    best = max(steered, key=lambda j: (j["trait"], j["coherence"]))
    assert (r.suggested_row, r.suggested_ratio) == (best["row"], best["ratio"])
    assert r.suggested_coef == best["coef"] and r.causal["judged_pick"]
    md = (tmp_path / "v" / "evil_report.md").read_text()
    assert "Judged steering check" in md and "| unsteered |" in md
