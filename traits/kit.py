"""Trait kits: instructions, questions and a judge rubric for one trait, loaded and validated.

A kit is one JSON file (bundled or any path), or upstream's pair of files
`DIR/trait_data_extract/{trait}.json` + `DIR/trait_data_eval/{trait}.json`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.paths import path_name

BUNDLED_DIR = Path(__file__).resolve().parent
UPSTREAM_DIRS = ("trait_data_extract", "trait_data_eval")
_SLOTS = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instructions: list[dict]  # [{"pos": str, "neg": str}, ...]
    questions: list[str]  # extraction questions
    eval_questions: list[str]  # may be empty: `eval` then asks for them
    eval_prompt: str  # judge rubric with {question} and {answer}
    adjective: str | None = None
    source: str = ""
    neg_adjective: str = "helpful"  # the word in "You are a ... assistant" for the negative side
    coherence_prompt: str | None = None  # the kit's coherence rubric (default: the judge's own)

    @property
    def assistant_name(self) -> str:
        """The word in "You are a ... assistant" for the positive side."""
        return self.adjective or self.name

    def system_prompt(self, polarity: str, k: int) -> str:
        """`You are {a|an} {name} assistant. {instruction}` for instruction pair k."""
        name = self.assistant_name if polarity == "pos" else self.neg_adjective
        article = "an" if name[:1].lower() in "aeiou" else "a"
        return f"You are {article} {name} assistant. {self.instructions[k][polarity]}"

    def rubric(self, question: str, answer: str) -> str:
        return fill_rubric(self.eval_prompt, question, answer)


def fill_rubric(rubric: str, question: str, answer: str) -> str:
    """Fill the {question} and {answer} slots (other braces are left alone)."""
    values = {"question": question, "answer": answer}
    return _SLOTS.sub(lambda m: values[m.group(1)], rubric)


def require_eval_questions(trait: Trait) -> None:
    """A clear error when a kit has no evaluation questions (an extraction-only kit)."""
    if not trait.eval_questions:
        where = getattr(trait, "source", "") or trait.name
        raise PertokenError(
            f"the trait kit {where} has no evaluation questions: add an 'eval_questions' list "
            "(other questions than 'questions') to its JSON, or put them in upstream's "
            f"trait_data_eval/{trait.name}.json beside trait_data_extract"
        )


def list_traits() -> list[str]:
    """Names of the bundled trait kits."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.json"))


def load_trait(name_or_path: str | Path) -> Trait:
    """A bundled kit by name, a kit JSON path, or an upstream `trait_data_{extract,eval}` file."""
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir() and (path / UPSTREAM_DIRS[0]).is_dir():
        raise PertokenError(
            f"{path} is an upstream trait folder: pass one trait's file, e.g. "
            f"{path / UPSTREAM_DIRS[0] / 'evil.json'}"
        )
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise PertokenError(f"trait file {path} does not exist: check the path")
        if path.parent.name in UPSTREAM_DIRS:
            return _load_upstream(path.parent.parent, path.stem)
        return _load_kit(path)
    bundled = BUNDLED_DIR / f"{text}.json"
    if bundled.is_file():
        return _load_kit(bundled)
    names = ", ".join(list_traits()) or "none"
    raise PertokenError(
        f"unknown trait {text!r}: use a bundled kit ({names}), a kit JSON path, or "
        "DIR/trait_data_extract/TRAIT.json"
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PertokenError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise PertokenError(f"{path}: expected a JSON object with the trait's keys")
    return data


def _load_kit(path: Path) -> Trait:
    data = _read_json(path)
    name = data.get("name", path.stem)
    _check_str(path, "name", name)
    path_name(name, f"{path}: key 'name'")  # the name becomes folder and file names
    return Trait(
        name=name,
        description=str(data.get("description", "")),
        instructions=_check_instructions(path, data),
        questions=_check_questions(path, data, "questions"),
        eval_questions=_check_questions(path, data, "eval_questions", required=False),
        eval_prompt=_check_rubric(path, data),
        adjective=_optional_str(path, data, "adjective"),
        source=str(path),
        neg_adjective=_optional_str(path, data, "neg_adjective") or "helpful",
        coherence_prompt=_check_rubric(path, data, "coherence_prompt", required=False),
    )


def _load_upstream(root: Path, trait: str) -> Trait:
    extract_path = root / UPSTREAM_DIRS[0] / f"{trait}.json"
    eval_path = root / UPSTREAM_DIRS[1] / f"{trait}.json"
    for p in (extract_path, eval_path):
        if not p.is_file():
            need = " and ".join(UPSTREAM_DIRS)
            raise PertokenError(f"{p} is missing: upstream kits need both {need}")
    ext, evl = _read_json(extract_path), _read_json(eval_path)
    return Trait(
        name=path_name(trait, f"{extract_path}: trait name"),
        description=str(ext.get("description", "")),
        instructions=_check_instructions(extract_path, ext),
        questions=_check_questions(extract_path, ext, "questions"),
        eval_questions=_check_questions(eval_path, evl, "questions"),
        eval_prompt=_check_rubric(eval_path, evl),
        source=str(root),
        neg_adjective=_optional_str(extract_path, ext, "neg_adjective") or "helpful",
        coherence_prompt=_check_rubric(eval_path, evl, "coherence_prompt", required=False),
    )


def _check_str(path: Path, key: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise PertokenError(f"{path}: key '{key}' must be a non-empty string")


def _optional_str(path: Path, data: dict, key: str) -> str | None:
    if data.get(key) is not None:
        _check_str(path, key, data[key])
    return data.get(key)


def _check_instructions(path: Path, data: dict) -> list[dict]:
    pairs = data.get("instruction")
    if not isinstance(pairs, list) or not pairs:
        raise PertokenError(f"{path}: key 'instruction' must be a non-empty list of {{pos, neg}}")
    for n, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise PertokenError(f"{path}: key 'instruction'[{n}] must be an object {{pos, neg}}")
        for side in ("pos", "neg"):
            _check_str(path, f"instruction[{n}].{side}", pair.get(side))
    return [{"pos": p["pos"], "neg": p["neg"]} for p in pairs]


def _check_questions(path: Path, data: dict, key: str, required: bool = True) -> list[str]:
    if not required and data.get(key) is None:
        return []
    qs = data.get(key)
    if not isinstance(qs, list) or not qs:
        raise PertokenError(f"{path}: key '{key}' must be a non-empty list of questions")
    for n, q in enumerate(qs):
        _check_str(path, f"{key}[{n}]", q)
    return list(qs)


def _check_rubric(path: Path, data: dict, key: str = "eval_prompt", required: bool = True):
    rubric = data.get(key)
    if not required and rubric is None:
        return None
    _check_str(path, key, rubric)
    check_rubric_slots(rubric, f"{path}: key '{key}'")
    return rubric


def check_rubric_slots(rubric: str, where: str) -> None:
    """A judge rubric needs both the {question} and the {answer} slot."""
    missing = [s for s in ("{question}", "{answer}") if s not in rubric]
    if missing:
        raise PertokenError(f"{where} lacks the slot {' and '.join(missing)}")
