"""The report card's causal columns: teacher-forced gain and cost per row, and the suggestion."""

import json

import numpy as np
import pytest

from pertoken.pipeline.vet.card import load_report
from pertoken.pipeline.vet.causal import Causal, answer_logprob, suggest
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


def _causal(gain, cost):
    return Causal(gain=gain, cost=cost, pairs=2, questions=2, tokens=8)


def test_suggestion_is_the_largest_gain_within_the_cost_bound():
    gain = {2: {"0.5": 0.4, "1": 2.0}, 3: {"0.5": 0.9, "1": 1.5}}
    cost = {2: {"0.5": 0.1, "1": 3.0}, 3: {"0.5": 0.2, "1": 0.6}}
    assert suggest(_causal(gain, cost), max_cost=0.5) == (3, "0.5", True)
    assert suggest(_causal(gain, cost), max_cost=1.0) == (3, "1", True)
    # nothing within the bound: the cheapest setting, flagged
    assert suggest(_causal(gain, cost), max_cost=0.05) == (2, "0.5", False)


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
    bounded = [s for s in settings if r.row(s[0]).cost[s[1]] <= r.causal["max_cost"]]
    if bounded:  # the suggestion is the best gain among the bounded settings
        best = max(r.row(a).gain[k] for a, k in bounded)
        assert row.gain[r.suggested_ratio] == best
    # the fake's vector moves its logits: steering changes both measures
    assert any(abs(g) > 1e-6 for x in r.rows if x.gain for g in x.gain.values())
    data = json.loads((tmp_path / "v" / "evil_report.json").read_text())
    assert data["rows"][2]["gain"] and data["causal"]["pairs"] >= 2
    assert load_report(tmp_path / "v" / "evil_report.json").suggested_coef == r.suggested_coef
    md = (tmp_path / "v" / "evil_report.md").read_text()
    assert "What steering does" in md and "| 2 |" in md.split("What steering does")[1]
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
    # one generate call for the own answers (causal), one for the judged check
    assert len(fake.generate_calls) == calls + 2
    held = r.split["held_out_questions"]
    # the two rows of best gain (cost within WIDE_COST) at each of the three coefficients
    assert r.judged[0]["row"] is None and len(r.judged) == 1 + 2 * 3
    assert all(j["n"] == len(held) and j["coherence"] == 80.0 for j in r.judged)
    steered = r.judged[1:]
    assert len({j["row"] for j in steered}) == 2
    # every setting kept coherence: the suggestion is the highest judged trait
    best = max(steered, key=lambda j: (j["trait"], j["coherence"]))
    assert (r.suggested_row, r.suggested_ratio) == (best["row"], best["ratio"])
    assert r.suggested_coef == best["coef"] and r.causal["judged_pick"]
    md = (tmp_path / "v" / "evil_report.md").read_text()
    assert "Judged steering check" in md and "| unsteered |" in md
