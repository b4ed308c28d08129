"""Trait kits: bundled, kit JSON and upstream layout; validation errors name file and key."""

import json

import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.pipeline.generate import plan_rows
from pertoken.traits import fill_rubric, list_traits, load_trait, require_eval_questions
from tests.small_kit import kit_dict, write_kit, write_upstream


def test_bundled_kits_load_and_list():
    names = list_traits()
    assert {"paternalism", "deception", "manipulativeness", "corrigibility"} <= set(names)
    for name in names:
        t = load_trait(name)
        assert t.name == name and len(t.instructions) == 5
        assert len(t.questions) == 20 and len(t.eval_questions) == 20
        assert not set(t.questions) & set(t.eval_questions)


def test_kit_json_and_upstream_layout_agree(tmp_path):
    kit = load_trait(write_kit(tmp_path, "evil"))
    up = load_trait(write_upstream(tmp_path / "up", "evil"))
    assert kit.name == up.name == "evil"
    assert kit.instructions == up.instructions
    assert kit.questions == up.questions and kit.eval_questions == up.eval_questions
    assert kit.eval_prompt == up.eval_prompt
    # the eval file also works as the entry point
    alt = load_trait(tmp_path / "up" / "trait_data_eval" / "evil.json")
    assert alt.eval_questions == kit.eval_questions


def test_system_prompt_article_and_adjective(tmp_path):
    evil = load_trait(write_kit(tmp_path, "evil"))
    assert evil.system_prompt("pos", 1) == "You are an evil assistant. Be evil in way 1."
    assert evil.system_prompt("neg", 0) == "You are a helpful assistant. Be kind in way 0."
    pat = load_trait(write_kit(tmp_path, "paternalism", adjective="paternalistic"))
    assert pat.system_prompt("pos", 0).startswith("You are a paternalistic assistant. ")


def test_kit_sets_the_negative_adjective_and_coherence_rubric(tmp_path):
    kit = kit_dict("evil")
    kit["neg_adjective"] = "obedient"
    kit["coherence_prompt"] = "Is this coherent? {question} / {answer}"
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(kit))
    evil = load_trait(path)
    assert evil.system_prompt("neg", 1) == "You are an obedient assistant. Be kind in way 1."
    assert evil.system_prompt("pos", 0) == "You are an evil assistant. Be evil in way 0."
    assert evil.coherence_prompt == kit["coherence_prompt"]
    plain = load_trait(write_kit(tmp_path, "kind"))
    assert plain.neg_adjective == "helpful" and plain.coherence_prompt is None


def test_extraction_only_kit_loads_and_eval_asks_for_questions(tmp_path):
    """Upstream's extract file alone (instruction, questions, eval_prompt) is a usable kit."""
    kit = {k: v for k, v in kit_dict("evil").items() if k in ("instruction", "questions")}
    kit["eval_prompt"] = kit_dict("evil")["eval_prompt"]
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(kit))
    evil = load_trait(path)
    assert evil.name == "evil" and evil.eval_questions == [] and len(evil.questions) == 2
    plan_rows(evil, polarity="neg", n_per_question=1)  # extraction needs no eval questions
    with pytest.raises(PertokenError, match=r"no evaluation questions: add an 'eval_questions'"):
        require_eval_questions(evil)
    with pytest.raises(PertokenError, match="no evaluation questions"):
        plan_rows(evil, eval=True)


def test_fill_rubric_leaves_other_braces():
    text = fill_rubric("Q={question} A={answer} {other}", "what {answer}?", "x {question}")
    assert text == "Q=what {answer}? A=x {question} {other}"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("instruction", [], "'instruction'"),
        ("questions", [], "'questions'"),
        ("eval_questions", "one question", "'eval_questions'"),
        ("eval_prompt", "Rate {answer} only.", "{question}"),
        ("instruction", [{"pos": "x"}], "instruction[0].neg"),
        ("questions", ["ok", ""], "questions[1]"),
        ("neg_adjective", "", "'neg_adjective'"),
        ("coherence_prompt", "Rate {question} only.", "'coherence_prompt' lacks the slot {answer}"),
        ("name", "../../../escaped", "key 'name'"),
        ("name", "/tmp/escaped", "key 'name'"),
        ("name", "..", "key 'name'"),
        ("name", "a\\b", "key 'name'"),
    ],
)
def test_validation_names_file_and_key(tmp_path, key, value, needle):
    kit = kit_dict("evil")
    if value is None:
        del kit[key]
    else:
        kit[key] = value
    path = tmp_path / "evil.json"
    path.write_text(json.dumps(kit))
    with pytest.raises(PertokenError) as e:
        load_trait(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_bad_json_missing_file_and_unknown_name(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PertokenError, match="bad.json: not valid JSON"):
        load_trait(bad)
    with pytest.raises(PertokenError, match="does not exist"):
        load_trait(tmp_path / "nope.json")
    with pytest.raises(PertokenError, match="unknown trait 'nosuchtrait'.*paternalism"):
        load_trait("nosuchtrait")
    up = write_upstream(tmp_path / "up", "evil")
    (tmp_path / "up" / "trait_data_eval" / "evil.json").unlink()
    with pytest.raises(PertokenError, match="trait_data_eval/evil.json is missing"):
        load_trait(up)


def test_cli_traits_list_and_show(tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["traits", "list"])
    assert r.exit_code == 0 and "paternalism" in r.output and "corrigibility" in r.output
    r = runner.invoke(main, ["traits", "show", str(write_kit(tmp_path, "evil"))])
    assert r.exit_code == 0
    assert "Be evil in way 1." in r.output and "problem 1" in r.output and "{answer}" in r.output
    r = runner.invoke(main, ["traits", "show", "nosuchtrait"])
    assert r.exit_code == 1 and "error: unknown trait" in r.output
