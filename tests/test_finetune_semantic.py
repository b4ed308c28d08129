"""The method's third use on the tiny model with a real trait (tests/semantic_model.py), through
the CLI: finetuning on answers written under the trait prompt (saved without a system prompt)
raises the judged trait; preventative steering along the persona vector clearly reduces that
rise; `screen` ranks trait answers above helpful ones; `shift` is positive for the
trait-finetuned model and lower for the one finetuned on helpful answers."""

import pytest

from tests import finetune_semantic as fs
from tests.bank_judge import BankJudge
from tests.cli_runner import pertoken_cli

pytestmark = pytest.mark.slow
PROMPT_LAST = (fs.LAYER, "prompt_last")
RESPONSE_AVG = (fs.LAYER, "response_avg")


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune-semantic")
    with BankJudge() as judge, pertoken_cli(root / "judge-cache") as cli:
        yield fs.workflow(root, cli, judge.base_url, "torch")


def _rise(res, name: str) -> float:
    return res["scores"][name] - res["scores"][res["base"]]


def test_finetuning_on_trait_answers_raises_the_judged_trait(res):
    for name in ("trait", "anti", "prevented"):
        loss = res["records"][name]["epoch_loss"]
        assert loss[-1] < loss[0], (name, loss)
    assert _rise(res, "trait") > 20, res["printed"]
    assert _rise(res, "anti") < -20, res["printed"]


def test_preventative_steering_clearly_reduces_the_rise(res):
    assert _rise(res, "prevented") < 0.5 * _rise(res, "trait"), res["printed"]
    assert res["records"]["prevented"]["edits"][0]["coef"] == fs.PREVENT_COEF


def test_screen_ranks_trait_answers_above_helpful_ones(res):
    assert res["screen"]["auroc"]["v"] > 0.9, res["screen"]
    assert res["screen"]["samples"] == 24


def test_shift_is_positive_for_trait_finetuning_and_lower_for_helpful(res):
    s = res["shifts"]
    for kind in (PROMPT_LAST, RESPONSE_AVG):
        assert s[res["base"]][kind] == 0
        assert s["trait"][kind] > 0, (kind, s)
        assert s["anti"][kind] < s["trait"][kind], (kind, s)
    assert s["prevented"][PROMPT_LAST] < s["trait"][PROMPT_LAST], s
    # across models that differ only in their data, the shift predicts the judged trait
    assert fs.pearson_unsteered(res, PROMPT_LAST) > 0.9, res["printed"]
