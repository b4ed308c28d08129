"""The coefficient search on a fake backend whose trait score and coherence follow the coef."""

import csv
import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from pertoken.backends.base import Summaries
from pertoken.errors import PertokenError
from pertoken.pipeline.options import Generation
from pertoken.pipeline.sweep.grid import evaluate
from pertoken.pipeline.sweep.search import format_search, search_coefs
from pertoken.pipeline.sweep.store import Sweep
from pertoken.vectors import PersonaVector

QUESTIONS = [f"question {i}?" for i in range(8)]
TRAIT = SimpleNamespace(name="bossy", eval_questions=QUESTIONS)


class FakeBackend:
    """Trait score 30 unsteered, 50 + 5 * coef * gain[layer] steered; coherence 90 up to
    coef `collapse`, 10 beyond. Every row has |v| = 1 and |h| = 2, so the search starts at 1."""

    name, model_id, n_layers, hidden_size, dtype = "fake", "fake-model", 4, 8, "float32"

    def __init__(self, gain=None, collapse=6.5):
        self.gain, self.collapse = gain or {1: 1.0, 3: 0.5}, collapse
        self.generated: list[tuple[int, float, int]] = []  # (layer, coef, prompts)
        self.seeded: list[tuple[tuple, set]] = []  # (setting, {(prompt, seed)}) per call

    def chat_prompt(self, system, user):
        return f"<u>{user}</u>"

    def generate(self, prompts, *, steer=None, **opts):
        if isinstance(steer, list):  # eval's grid: one steer per prompt, answered per setting
            return self._grid(prompts, steer, **opts)
        layer, coef = (0, 0.0) if steer is None else (steer.terms[0].row, steer.terms[0].coef)
        self.generated.append((layer, coef, len(prompts)))
        self.seeded.append(((layer, coef), set(zip(prompts, opts["seeds"], strict=True))))
        trait = 30.0 if coef == 0 else min(95.0, 50 + 5 * coef * self.gain[layer])
        coherence = 90.0 if coef <= self.collapse else 10.0
        return [f"trait={trait} coherence={coherence} to {p}" for p in prompts]

    def _grid(self, prompts, steers, *, seeds, **opts):
        def key(s):
            return None if s is None else (s.terms[0].row, s.terms[0].coef)

        out = [None] * len(prompts)
        for k in dict.fromkeys(key(s) for s in steers):
            idx = [i for i, s in enumerate(steers) if key(s) == k]
            steer = next(steers[i] for i in idx)
            got = self.generate(
                [prompts[i] for i in idx], steer=steer, seeds=[seeds[i] for i in idx], **opts
            )
            for i, a in zip(idx, got, strict=True):
                out[i] = a
        return out

    def summaries(self, prompts, answers, *, batch_size=8):
        h = np.zeros((len(prompts), self.n_layers + 1, self.hidden_size), np.float32)
        h[..., 0] = 2.0
        return Summaries(h, h, h)


class FakeJudge:
    identity = None

    def __init__(self):
        self.seen = []

    def judge_rows(self, rows):
        self.seen += rows
        for r in rows:
            t, c = re.match(r"trait=([\d.]+) coherence=([\d.]+)", r["answer"]).groups()
            r["bossy"], r["coherence"] = float(t), float(c)
        return rows


def vector():
    data = np.zeros((5, 8), np.float32)
    data[:, 1] = 1.0
    return PersonaVector(data)


def search(backend, out, judge, layers=(1, 3), samples=2, progress=False):
    spec, generation = Sweep(TRAIT, vector(), list(layers)), Generation(samples=samples)
    return search_coefs(backend, spec, out_dir=out, judge=judge, generation=generation,
                        min_coherence=70, progress=progress)  # fmt: skip


def test_search_grows_then_bisects_and_picks_the_best_coherent_setting(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    r = search(backend, tmp_path, judge)
    tried = {L: sorted({c for lay, c, _ in backend.generated if lay == L}) for L in (1, 3)}
    # start at 0.5 * |h| / |v| = 1, double while coherence holds, bisect 4..8 twice
    assert tried[1] == [1.0, 2.0, 4.0, 6.0, 7.0, 8.0] == tried[3]
    assert (r.best.layer, r.best.coef) == (1, 6.0) and r.best.full
    assert r.best.trait == 80.0 and r.best.coherence == 90.0 and r.best.ratio == 3.0
    assert r.best.trait > r.unsteered.trait == 30.0
    rows = {x.layer: (x.coef, x.trait) for x in r.rows}
    assert rows == {1: (6.0, 80.0), 3: (6.0, 65.0)}
    # the search steps answer the first quarter of the questions; the finals all of them
    per_setting = {}
    for lay, c, n in backend.generated:
        per_setting[(lay, c)] = per_setting.get((lay, c), 0) + n
    assert per_setting[(1, 2.0)] == 2 * 2 and per_setting[(1, 6.0)] == 8 * 2
    assert per_setting[(0, 0.0)] == 8 * 2  # the unsteered answers, once, on every question
    assert r.answers == len(judge.seen) < r.grid_answers == (1 + 4 * 2) * 8 * 2


def test_search_writes_answers_summary_plot_and_its_result(tmp_path):
    r = search(FakeBackend(), tmp_path, FakeJudge())
    with open(tmp_path / "answers.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames[:6] == [
            "layer",
            "coef",
            "question",
            "answer",
            "bossy",
            "coherence",
        ]
        assert len(list(reader)) == r.answers
    data = json.loads((tmp_path / "search.json").read_text())
    assert data["best"]["coef"] == 6.0 and data["floor"] == 70 and data["answers"] == r.answers
    full = [p for p in data["points"] if p["layer"] == 1 and p["coef"] == 6.0]
    assert full[0]["n"] == 16 and full[0]["trait_ci"] == 0.0  # 16 equal scores
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    with open(tmp_path / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert {(s["layer"], s["coef"]) for s in summary} >= {("1", "0.0"), ("3", "0.0"), ("1", "6.0")}
    text = format_search("bossy", r)
    assert "best: layer 1 coef 6" in text and f"judged {r.answers} answers" in text


def test_rerun_resumes_without_generating_or_judging(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    first = search(backend, tmp_path, judge)
    n_gen, n_judged = len(backend.generated), len(judge.seen)
    again = search(backend, tmp_path, judge)
    assert len(backend.generated) == n_gen and len(judge.seen) == n_judged
    assert again.generated == 0 and again.best == first.best and again.answers == first.answers


def test_search_shares_answers_with_a_sweep_in_the_same_folder(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    opts = dict(out_dir=tmp_path, judge=judge, generation=Generation(samples=2), progress=False)
    evaluate(backend, Sweep(TRAIT, vector(), [1, 3], [0, 2]), **opts)
    before = len(backend.generated)
    r = search_coefs(backend, Sweep(TRAIT, vector(), [1, 3]), **opts)
    assert all(c != 0 for _, c, _ in backend.generated[before:])  # the unsteered are reused
    assert r.best.coef == 6.0


def test_a_sweep_after_a_search_reuses_its_answers(tmp_path):
    backend, judge = FakeBackend(), FakeJudge()
    search(backend, tmp_path, judge, layers=[1])
    before = len(backend.generated)
    spec, generation = Sweep(TRAIT, vector(), [1, 3], [0, 6.0]), Generation(samples=2)
    r = evaluate(backend, spec, out_dir=tmp_path, judge=judge, generation=generation,
                 progress=False)  # fmt: skip
    # the unsteered answers and layer 1's coef 6 (a final, on every question) are the search's
    assert backend.generated[before:] == [(3, 6.0, 8 * 2)]
    assert r.generated == 2  # settings new to the grid: (3, 0) is a copy, (3, 6) is answered
    assert {(s.layer, s.coef, s.n) for s in r.summary} == {
        (L, c, 8 * 2) for L in (1, 3) for c in (0.0, 6.0)
    }


def test_search_samples_each_question_with_the_seeds_a_sweep_uses(tmp_path):
    swept, searched = FakeBackend(), FakeBackend()
    opts = dict(judge=FakeJudge(), generation=Generation(samples=2, seed=3), progress=False)
    evaluate(swept, Sweep(TRAIT, vector(), [1], [2.0]), out_dir=tmp_path / "a", **opts)
    search_coefs(searched, Sweep(TRAIT, vector(), [1]), out_dir=tmp_path / "b", **opts)
    (sweep_pairs,) = [pairs for setting, pairs in swept.seeded if setting == (1, 2.0)]
    search_pairs = set().union(
        *(pairs for setting, pairs in searched.seeded if setting == (1, 2.0))
    )
    assert search_pairs and search_pairs <= sweep_pairs


def test_no_coherent_coefficient_is_reported_not_raised(tmp_path):
    r = search(FakeBackend(collapse=0.1), tmp_path, FakeJudge())
    assert r.best is None and all(x.coef is None for x in r.rows)
    text = format_search("bossy", r)
    assert "best: none kept coherence >= 70" in text and "no coefficient kept" in text


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(PertokenError, match=r"\[5, 8\].*another model"):
        search_coefs(
            FakeBackend(),
            Sweep(TRAIT, PersonaVector(np.ones((5, 16))), [1]),
            out_dir=tmp_path,
            judge=FakeJudge(),
        )
    with pytest.raises(PertokenError, match="outside 1..4"):
        search(FakeBackend(), tmp_path, FakeJudge(), layers=[5])
    search(FakeBackend(), tmp_path, FakeJudge())
    with pytest.raises(PertokenError, match="other settings.*n_per_question"):
        search(FakeBackend(), tmp_path, FakeJudge(), samples=3)


class BorderlineBackend(FakeBackend):
    """Coherence of layer 1 coef 2 alternates 50 / 90 by question: its mean sits on the floor."""

    def generate(self, prompts, *, steer=None, **opts):
        out = super().generate(prompts, steer=steer, **opts)
        if isinstance(steer, list) or steer is None or steer.terms[0].coef != 2.0:
            return out
        odd = [int(re.search(r"question (\d+)", p)[1]) % 2 for p in prompts]
        return [a.replace("coherence=90.0", f"coherence={50 + 40 * k}.0") for a, k in zip(out, odd)]


def test_search_grows_the_sample_while_the_decision_is_unclear_and_says_so(tmp_path):
    backend = BorderlineBackend()
    r = search(backend, tmp_path, FakeJudge(), layers=[1])
    asked = sum(n for lay, c, n in backend.generated if (lay, c) == (1, 2.0))
    assert asked == 8 * 2  # grown from the 2-question subset to every question
    assert [(p.layer, p.coef, p.n) for p in r.undecided] == [(1, 2.0, 16)]
    assert asked_clear(backend) == 2 * 2  # coef 1 was clear on the subset: not grown
    text = format_search("bossy", r)
    assert "undecided: layer 1 coef 2" in text and "raise --n-per-question" in text
    data = json.loads((tmp_path / "search.json").read_text())
    assert data["unsteered"]["layer"] is None and data["unsteered"]["coef"] == 0.0
    assert data["undecided"][0]["coef"] == 2.0


def asked_clear(backend) -> int:
    return sum(n for lay, c, n in backend.generated if (lay, c) == (1, 1.0))
