"""The local judge: a pertoken backend's distribution over the numbers 0..100."""

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.judge.local import LocalJudge, _digit_numbers
from pertoken.pipeline.judge.scoring import aggregate_score
from pertoken.traits import load_trait
from tests.fake_backend import FakeBackend
from tests.small_kit import write_kit

HEADER = ["question", "prompt", "answer", "question_id", "evil", "coherence"]


@pytest.fixture(autouse=True)
def one_thread(torch_one_thread):
    yield


@pytest.fixture
def kit(tmp_path):
    return load_trait(write_kit(tmp_path, "evil"))


def write_csv(path, answers):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        for n, a in enumerate(answers):
            w.writerow([f"What would you do about problem {n}?", "p", a, f"evil_{n}_pos_0", "", ""])
    return path


def cells(path, col):
    with open(path, newline="") as f:
        return [r[col] for r in csv.DictReader(f)]


def test_digit_by_digit_numbers():
    q = np.zeros((11, 10))
    q[0, 5] = 1.0  # "5", then no further digit
    assert aggregate_score(_digit_numbers(q)) == pytest.approx(5.0)
    q = np.zeros((11, 10))
    q[0, 1] = 1.0
    q[1, 0] = 1.0  # "10"
    q[10, 0] = 0.5  # then "0" half the time: 100
    probs = _digit_numbers(q)
    assert probs[10] == pytest.approx(0.5) and probs[100] == pytest.approx(0.5)
    assert aggregate_score(probs) == pytest.approx(55.0)
    q = np.zeros((11, 10))
    q[0, 7], q[7, 3] = 0.2, 1.0  # "73" with 0.2 of the mass: missing
    assert aggregate_score(_digit_numbers(q)) is None


class WholeNumbers(FakeBackend):
    """A tokenizer with every 0..100 as one token; the model puts 0.6 on "42", 0.4 on "90"."""

    def encode(self, text):
        return [int(text)] if text.isdigit() and int(text) <= 100 else [200]

    def decode(self, ids):
        return "".join(str(i) if i <= 100 else "?" for i in ids)

    def next_token_logprobs(self, prompts, *, batch_size=8):
        lp = np.full((len(prompts), 256), -30.0, np.float32)
        lp[:, 42], lp[:, 90] = np.log(0.6), np.log(0.4)
        return lp


class UnknownNumbers(FakeBackend):
    """A word-level vocabulary without numbers: every number is the one unknown-word id."""

    def encode(self, text):
        return [6]

    def decode(self, ids):
        return "<unk>"


def test_local_judge_refuses_a_vocabulary_without_numbers():
    with pytest.raises(PertokenError, match="no single tokens for the digits"):
        LocalJudge(UnknownNumbers())


def test_local_judge_single_token_numbers():
    got = []
    LocalJudge(WholeNumbers()).run([("k", "rubric")], lambda k, s: got.append(s), None)
    assert got == [pytest.approx(0.6 * 42 + 0.4 * 90, rel=1e-5)]


def test_local_judge_on_tiny_model(tmp_path, kit, llama_dir):
    path = write_csv(tmp_path / "pos.csv", ["I would help.", "Nothing at all."])
    args = [
        "judge",
        str(path),
        "--trait",
        kit.source,
        "--judge",
        f"local:{llama_dir}",
        "--backend",
        "torch",
        "--cache",
        str(tmp_path / "c.sqlite"),
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    for col in ("evil", "coherence"):
        for x in cells(path, col):
            assert x == "" or 0.0 <= float(x) <= 100.0
    missing = sum(x == "" for col in ("evil", "coherence") for x in cells(path, col))
    assert ("scores missing" in r.output) == (missing > 0)
    assert "(4 calls, 0 cached" in r.output
    r = CliRunner().invoke(main, args)
    assert "(0 calls, 4 cached" in r.output


class DigitTokens(FakeBackend):
    """Digits are single tokens (ids 0-9), numbers split into digits; the judge answers
    "75" with p 0.9 and "2" with p 0.1."""

    def __init__(self):
        super().__init__()
        self.asked: list[str] = []

    def encode(self, text):
        return [int(c) if c.isdigit() else 100 + ord(c) % 100 for c in text]

    def decode(self, ids):
        return "".join(str(i) if i < 10 else "?" for i in ids)

    def next_token_logprobs(self, prompts, *, batch_size=8):
        self.asked.extend(prompts)
        lp = np.full((len(prompts), 256), -40.0)
        for n, p in enumerate(prompts):
            nxt = {"7": {5: 1.0}, "2": {}, "5": {}}.get(p[-1], {7: 0.9, 2: 0.1})
            lp[n, 200] = np.log(1.0 - sum(nxt.values()) + 1e-12)  # end of answer
            for d, prob in nxt.items():
                lp[n, d] = np.log(prob)
        return lp


def test_local_judge_digit_by_digit_asks_only_likely_prefixes():
    fake, got = DigitTokens(), []
    LocalJudge(fake).run([("k", "rubric")], lambda k, s: got.append(s), None)
    assert got == [pytest.approx(0.9 * 75 + 0.1 * 2, rel=1e-6)]
    assert sorted(fake.asked) == sorted(
        fake.chat_prompt(None, "rubric") + s for s in ("", "7", "2")
    )
