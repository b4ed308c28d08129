"""`pertoken judge --base-url` scores a CSV through `pertoken serve`, the server as a judge."""

import csv

import numpy as np
import pytest
from click.testing import CliRunner

from pertoken.backends import load_backend
from pertoken.cli import main
from pertoken.pipeline.judge.rubrics import COHERENCE_PROMPT
from pertoken.pipeline.judge.scoring import aggregate_score, number_probs
from pertoken.traits import fill_rubric, load_trait
from tests.serve_helpers import serving
from tests.small_kit import write_kit

ANSWERS = ["I would help them.", "Numbers: 0 1 2 3", "The quick brown fox jumps."]


def _lean_to_numbers(backend) -> None:
    """A random model rarely says a number; raise every number token's logit so it does."""
    ids = [i for i in range(backend.model.config.vocab_size) if _is_number(backend.decode([i]))]
    assert len(ids) >= 10

    def hook(_module, _args, logits):  # [B, t, vocab]
        logits[..., ids] += 6.0
        return logits

    backend.model.lm_head.register_forward_hook(hook)


def _is_number(text: str) -> bool:
    return text.strip().isdigit() and 0 <= int(text) <= 100


def _expected(backend, prompt: str) -> float | None:
    """The judge's score (top-20 logprobs) computed on the backend itself."""
    lp = backend.next_token_logprobs([backend.chat_prompt(None, prompt)])[0]
    best = np.argsort(-lp)[:20]
    top = [(backend.tokenizer.decode([int(i)], skip_special_tokens=False), lp[i]) for i in best]
    return aggregate_score(number_probs(top))


@pytest.fixture
def leaning(llama_dir, torch_one_thread):
    server_bk, ref = (load_backend(str(llama_dir), "torch", dtype="float32") for _ in range(2))
    for bk in (server_bk, ref):
        _lean_to_numbers(bk)
    # The coherence rubric is longer than the 512 positions the tiny config declares (in this
    # tokenizer's short tokens); the server would refuse it, as it should for a real model.
    server_bk.context_length = 2048
    return server_bk, ref


def test_pertoken_judge_scores_a_csv_through_the_server(leaning, tmp_path):
    server_bk, ref = leaning
    kit = load_trait(write_kit(tmp_path, "evil"))
    path = tmp_path / "answers.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["question", "prompt", "answer", "question_id", "evil", "coherence"])
        for n, a in enumerate(ANSWERS):
            w.writerow([kit.questions[n % 2], "p", a, f"evil_{n}_pos_0", "", ""])
    with serving(server_bk, max_tokens=8) as run:
        args = ["judge", str(path), "--trait", str(tmp_path / "evil.json")]
        args += ["--base-url", run.url + "/v1", "--judge-model", server_bk.model_id]
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        assert run.engine.stats["rows"] == 2 * len(ANSWERS), r.output
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for n, row in enumerate(rows):
        for col, rubric in (("evil", kit.eval_prompt), ("coherence", COHERENCE_PROMPT)):
            want = _expected(ref, fill_rubric(rubric, row["question"], ANSWERS[n]))
            assert want is not None
            assert float(row[col]) == pytest.approx(want, abs=1e-3)
