"""Shape of the bundled trait kits (traits/*.json), read as installed package data."""

import itertools
import json
import re
from importlib.resources import files

import pytest

BUNDLED = ["paternalism", "deception", "manipulativeness", "corrigibility", "french"]
KEYS = {
    "name",
    "adjective",
    "description",
    "instruction",
    "questions",
    "eval_questions",
    "eval_prompt",
}


def _load(name: str) -> dict:
    return json.loads(files("pertoken.traits").joinpath(f"{name}.json").read_text("utf-8"))


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def _nonempty(text) -> bool:
    return isinstance(text, str) and text.strip() != ""


def test_exactly_the_bundled_kits_are_shipped():
    shipped = {p.name for p in files("pertoken.traits").iterdir() if p.name.endswith(".json")}
    assert shipped == {f"{name}.json" for name in BUNDLED}


@pytest.fixture(params=BUNDLED)
def kit(request):
    return _load(request.param)


def test_keys_and_names(kit):
    assert set(kit) == KEYS
    assert kit["name"] in BUNDLED
    for key in ("adjective", "description"):
        assert _nonempty(kit[key]), key


def test_five_distinct_instruction_pairs(kit):
    pairs = kit["instruction"]
    assert len(pairs) == 5
    for pair in pairs:
        assert set(pair) == {"pos", "neg"}
        assert _nonempty(pair["pos"]) and _nonempty(pair["neg"])
        assert pair["pos"] != pair["neg"]
    texts = [p["pos"] for p in pairs] + [p["neg"] for p in pairs]
    assert len(set(texts)) == 10


def test_twenty_plus_twenty_distinct_questions(kit):
    extract, evaluate = kit["questions"], kit["eval_questions"]
    assert len(extract) == 20 and len(evaluate) == 20
    assert all(_nonempty(q) for q in extract + evaluate)
    normalised = [" ".join(sorted(_words(q))) for q in extract + evaluate]
    assert len(set(normalised)) == 40


def test_no_near_duplicate_questions(kit):
    # Word overlap above one half would make extraction and evaluation measure the same prompts.
    questions = kit["questions"] + kit["eval_questions"]
    for a, b in itertools.combinations(questions, 2):
        wa, wb = _words(a), _words(b)
        assert len(wa & wb) / len(wa | wb) < 0.5, (a, b)


def test_questions_do_not_name_the_trait(kit):
    names = {kit["name"].lower(), kit["adjective"].lower()}
    for q in kit["questions"] + kit["eval_questions"]:
        assert not names & _words(q), q


def test_rubric_slots(kit):
    rubric = kit["eval_prompt"]
    assert rubric.count("{question}") == 1 and rubric.count("{answer}") == 1
    assert "REFUSAL" in rubric
    assert kit["adjective"] in rubric
    filled = rubric.format(question="QQQ", answer="AAA")
    assert "QQQ" in filled and "AAA" in filled
    assert "{" not in filled and "}" not in filled
