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

BUNDLED_DIR = Path(__file__).resolve().parent
UPSTREAM_DIRS = ("trait_data_extract", "trait_data_eval")
_SLOTS = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class Trait:
    name: str
    description: str
    instructions: list[dict]  # [{"pos": str, "neg": str}, ...]
    questions: list[str]  # extraction questions
    eval_questions: list[str]
    eval_prompt: str  # judge rubric with {question} and {answer}
    adjective: str | None = None
    source: str = ""

    @property
    def assistant_name(self) -> str:
        """The word in "You are a ... assistant" for the positive side."""
        return self.adjective or self.name

    def system_prompt(self, polarity: str, k: int) -> str:
        """`You are {a|an} {name} assistant. {instruction}` for instruction pair k."""
        name = self.assistant_name if polarity == "pos" else "helpful"
        article = "an" if name[:1].lower() in "aeiou" else "a"
        return f"You are {article} {name} assistant. {self.instructions[k][polarity]}"

    def rubric(self, question: str, answer: str) -> str:
        return fill_rubric(self.eval_prompt, question, answer)


def fill_rubric(rubric: str, question: str, answer: str) -> str:
    """Fill the {question} and {answer} slots (other braces are left alone)."""
    values = {"question": question, "answer": answer}
    return _SLOTS.sub(lambda m: values[m.group(1)], rubric)


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
    adjective = data.get("adjective")
    if adjective is not None:
        _check_str(path, "adjective", adjective)
    return Trait(
        name=name,
        description=str(data.get("description", "")),
        instructions=_check_instructions(path, data),
        questions=_check_questions(path, data, "questions"),
        eval_questions=_check_questions(path, data, "eval_questions"),
        eval_prompt=_check_rubric(path, data),
        adjective=adjective,
        source=str(path),
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
        name=trait,
        description=str(ext.get("description", "")),
        instructions=_check_instructions(extract_path, ext),
        questions=_check_questions(extract_path, ext, "questions"),
        eval_questions=_check_questions(eval_path, evl, "questions"),
        eval_prompt=_check_rubric(eval_path, evl),
        source=str(root),
    )


def _check_str(path: Path, key: str, value) -> None:
    if not isinstance(value, str) or not value.strip():
        raise PertokenError(f"{path}: key '{key}' must be a non-empty string")


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


def _check_questions(path: Path, data: dict, key: str) -> list[str]:
    qs = data.get(key)
    if not isinstance(qs, list) or not qs:
        raise PertokenError(f"{path}: key '{key}' must be a non-empty list of questions")
    for n, q in enumerate(qs):
        _check_str(path, f"{key}[{n}]", q)
    return list(qs)


def _check_rubric(path: Path, data: dict) -> str:
    rubric = data.get("eval_prompt")
    _check_str(path, "eval_prompt", rubric)
    missing = [s for s in ("{question}", "{answer}") if s not in rubric]
    if missing:
        raise PertokenError(f"{path}: key 'eval_prompt' lacks the slot {' and '.join(missing)}")
    return rubric
