"""A deterministic keyword judge for the bundled `french` kit, no LLM involved.

Trait: the share of French among the function words of the answer (0-100). Coherence: the
share of distinct word pairs, so that a steered answer looping on "la la la" scores near 0 while
an ordinary answer scores near 100. `KeywordJudge` fills rows in-process (the pipeline's Judge
protocol); `python -m tests.french_judge --port 8011` serves the same scores as an
OpenAI-compatible judge (`--judge keyword --base-url http://127.0.0.1:8011/v1`).
"""

from __future__ import annotations

import re

from tests.bank_judge import BankJudge, answer_of

FRENCH = set(
    "le la les un une des du de et est sont en que qui dans pour pas sur au aux avec ce cette "
    "ces il elle ils elles je tu nous vous mais ou très plus par son sa ses leur leurs être "
    "avoir fait peut aussi comme tout tous mon ma mes ton ta votre vos notre nos on se ne "
    "y où quand c'est j'ai d'un d'une l'eau qu'il".split()
)
ENGLISH = set(
    "the a an and is are of to in that it for on with as this be you your i we they not but "
    "or very more by his her their was were have has do does can will would my our its "
    "what when where there these those from at".split()
)
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def french_score(answer: str) -> float:
    """100 * French / (French + English) function words; 0 when there are none."""
    ws = words(answer)
    fr = sum(w in FRENCH for w in ws)
    en = sum(w in ENGLISH for w in ws)
    return 0.0 if fr + en == 0 else round(100 * fr / (fr + en), 1)


def coherence_score(answer: str) -> float:
    """100 * distinct word pairs / 0.8 of all pairs (capped); 0 below three words."""
    ws = words(answer)
    if len(ws) < 3:
        return 0.0
    pairs = list(zip(ws, ws[1:]))
    return round(min(100.0, 100 * len(set(pairs)) / len(pairs) / 0.8), 1)


def score_message(message: str) -> float:
    answer = answer_of(message)
    return coherence_score(answer) if "coheren" in message.lower() else french_score(answer)


class KeywordJudge:
    """The pipeline's Judge protocol over the keyword scores (`french`, `coherence` cells)."""

    identity = {"model": "keyword-french"}

    def __init__(self, trait: str = "french"):
        self.trait = trait

    def judge_rows(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            r[self.trait] = repr(french_score(r["answer"]))
            r["coherence"] = repr(coherence_score(r["answer"]))
        return rows


def main() -> None:
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Serve the French keyword judge.")
    parser.add_argument("--port", type=int, default=8011)
    port = parser.parse_args().port
    with BankJudge(score=lambda text: round(score_message(text)), port=port) as judge:
        print(f"keyword judge at {judge.base_url}", flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    main()
