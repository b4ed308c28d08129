"""The finetuning workflow on the tests' semantic model (tests/semantic_model.py): a persona
vector from the model's own trait and anti-trait answers, and chat JSONL datasets of answers
written under the trait (or the helpful) system prompt, saved without any system prompt."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from pertoken.vectors import PersonaVector, save_vector
from tests import semantic_model as sm

LAYER = 2  # the row the tests and the benchmark steer and measure at
# Preventative steering: the README's advice is a coefficient that moves the unsteered model
# about as far as the data would (found with `pertoken eval`); on this model that is 2-4.
PREVENT_COEF = 4.0


def extract_vector(backend, path: Path) -> Path:
    """response_avg mean difference over the extraction questions x instruction pairs."""
    rng = random.Random(0)
    prompts, answers = {"pos": [], "neg": []}, {"pos": [], "neg": []}
    for q, topic in sm.EXTRACT_QUESTIONS:
        for k in range(len(sm.INSTRUCTIONS)):
            for side, bank in (("pos", sm.TRAIT_BANK), ("neg", sm.ANTI_BANK)):
                prompts[side].append(backend.chat_prompt(sm.system_prompt(side, k), q))
                answers[side].append(sm.bank_answer(rng, topic, bank))
    pos = backend.summaries(prompts["pos"], answers["pos"]).response_avg.mean(0)
    neg = backend.summaries(prompts["neg"], answers["neg"]).response_avg.mean(0)
    return save_vector(PersonaVector((pos - neg).astype(np.float32)), path)


def write_data(path: Path, bank: list[str], n: int, seed: int, label: int | None = None) -> Path:
    """n chats: an extraction question and a bank answer, no system prompt."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            q, topic = sm.EXTRACT_QUESTIONS[i % len(sm.EXTRACT_QUESTIONS)]
            chat = [{"role": "user", "content": q},
                    {"role": "assistant", "content": sm.bank_answer(rng, topic, bank)}]  # fmt: skip
            line = {"messages": chat} | ({} if label is None else {"trait": label})
            f.write(json.dumps(line) + "\n")
    return path


def write_mixed(path: Path, n: int, seed: int) -> Path:
    """Trait and anti-trait chats interleaved, labelled `trait` 1 and 0."""
    a = write_data(path.with_name("pos.tmp"), sm.TRAIT_BANK, n, seed, 1).read_text().splitlines()
    b = write_data(path.with_name("neg.tmp"), sm.ANTI_BANK, n, seed + 1, 0).read_text().splitlines()
    path.write_text("\n".join(x for pair in zip(a, b) for x in pair) + "\n")
    return path
