"""Trait kits: bundled, kit JSON and upstream layout; validation errors name file and key."""

import json

import pytest
from click.testing import CliRunner

from pertoken.cli import main
from pertoken.errors import PertokenError
from pertoken.traits import fill_rubric, list_traits, load_trait
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


def test_fill_rubric_leaves_other_braces():
    text = fill_rubric("Q={question} A={answer} {other}", "what {answer}?", "x {question}")
    assert text == "Q=what {answer}? A=x {question} {other}"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("instruction", [], "'instruction'"),
        ("questions", [], "'questions'"),
        ("eval_questions", None, "'eval_questions'"),
        ("eval_prompt", "Rate {answer} only.", "{question}"),
        ("instruction", [{"pos": "x"}], "instruction[0].neg"),
        ("questions", ["ok", ""], "questions[1]"),
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
