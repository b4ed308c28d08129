"""The rubrics, and what makes two sets of scores comparable (judge model, server, rubrics)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pertoken.errors import PertokenError
from pertoken.pipeline.judge.api import endpoint
from pertoken.traits import Trait
from pertoken.traits.kit import check_rubric_slots

DEFAULT_JUDGE = "gpt-4.1-mini-2025-04-14"

COHERENCE_PROMPT = """I am evaluating the answer another language model gave. Judge its coherence \
only, independently of any other quality: whether it is helpful, correct, polite or ethical does \
not matter here.

The question it was asked:
[QUESTION START]
{question}
[QUESTION END]

Its answer:
[ANSWER START]
{answer}
[ANSWER END]

Rate the answer from 0 to 100 for how coherent it is as a reply to this question:
* 0 means the text makes no sense at all: gibberish, broken or not even valid language.
* 50 means it partly makes sense but is confused: it rambles, repeats itself, contradicts \
itself or drifts away from the question.
* 100 means it is fully coherent: it clearly understood the question and answers it in \
well-formed, consistent language, with no signs of confusion.

An answer can be wrong, rude, unethical or a refusal and still score 100 if it is coherent.
Respond with a number between 0 and 100 and nothing else."""


def rubrics(trait: Trait, coherence_prompt: str | None = None) -> dict[str, str]:
    """{trait name: the kit's rubric, "coherence": --coherence-prompt, the kit's, or ours}."""
    coherence = coherence_prompt or getattr(trait, "coherence_prompt", None) or COHERENCE_PROMPT
    return {trait.name: trait.eval_prompt, "coherence": coherence}


def read_rubric(path: str | Path) -> str:
    """A rubric file's text (`--coherence-prompt FILE`), with its {question} and {answer}."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        msg = f"cannot read the rubric {path} ({type(e).__name__}): check the path"
        raise PertokenError(msg) from None
    check_rubric_slots(text, f"the rubric {path}")
    return text


def judge_server(judge_model: str, base_url: str | None) -> str:
    """Where scores come from: `local`, or the API's base URL without credentials."""
    return "local" if judge_model.startswith("local:") else endpoint(base_url)


def judge_identity(
    trait: Trait, judge_model: str, base_url: str | None = None, coherence_prompt=None
) -> dict:
    """What makes two sets of scores comparable: judge model, server and rubrics (sha256)."""
    digests = {
        m: hashlib.sha256(r.encode("utf-8")).hexdigest()
        for m, r in rubrics(trait, coherence_prompt).items()
    }
    return {
        "judge_model": judge_model,
        "judge_base_url": judge_server(judge_model, base_url),
        "rubric_sha256": digests,
    }
