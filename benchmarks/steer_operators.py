"""Steering operators on the tiny model with a real trait (tests/semantic_model.py): trait
score and coherence of answers written under the trait's system prompt, for no steering,
ablating the trait vector, capping its projection, and adding it with a negative coefficient.
Run from the repository root:

    python -m benchmarks.steer_operators [--backend torch|mlx] [--row 3] [--samples 4]

The vector is the mean difference of the trait's and the helpful bank answers (response_avg,
as `extract` computes it) at every row. The cap's upper bound is the median projection of the
answer tokens the model writes with no system prompt, read as `trace` reads it. Answers are
judged by phrase bank (tests/bank_judge.py): trait 10..90 by the share of trait phrases,
coherence 90 with a bank phrase and 20 without.
"""

from __future__ import annotations

import argparse

import numpy as np

from pertoken.backends import Steer, load_backend
from tests import semantic_model as sm
from tests.bank_judge import coherence_score, trait_score

QUESTIONS = [q for q, _ in sm.EVAL_QUESTIONS]


def trait_vector(backend) -> np.ndarray:
    """[n_layers + 1, hidden]: mean response_avg of trait-bank answers minus helpful-bank ones,
    each under its own system prompt, as extraction pairs them."""
    import random

    rng, means = random.Random(0), {}
    for polarity, bank in (("pos", sm.TRAIT_BANK), ("neg", sm.ANTI_BANK)):
        prompts, answers = [], []
        for k in range(len(sm.INSTRUCTIONS)):
            for q, topic in sm.EXTRACT_QUESTIONS:
                prompts.append(backend.chat_prompt(sm.system_prompt(polarity, k), q))
                answers.append(sm.bank_answer(rng, topic, bank))
        means[polarity] = backend.summaries(prompts, answers).response_avg.mean(0)
    return (means["pos"] - means["neg"]).astype(np.float32)


def median_projection(backend, vec: np.ndarray, row: int, samples: int) -> float:
    """The median projection on vec[row] of the answer tokens written with no system prompt."""
    prompts = [backend.chat_prompt(None, q) for q in QUESTIONS for _ in range(samples)]
    answers = backend.generate(prompts, max_new_tokens=24, temperature=1.0, seed=1)
    ids = [backend.encode(p) + backend.encode(a) for p, a in zip(prompts, answers)]
    lens = [len(backend.encode(p)) for p in prompts]
    unit = (vec[row] / np.linalg.norm(vec[row]))[None, None]
    got = backend.token_projections(ids, unit, [row], prompt_lens=lens)
    return float(np.median(np.concatenate([g[n:, 0, 0] for g, n in zip(got, lens)])))


def settings(backend, vec: np.ndarray, row: int, samples: int, coef: float) -> dict:
    hi = median_projection(backend, vec, row, samples)
    return {
        "none": None,
        "ablate": Steer.ablate(row, vec[row], positions="all"),
        f"cap <= {hi:.2f}": Steer.cap(row, vec[row], hi=hi, positions="all"),
        f"add {coef:g}": Steer.add(row, vec[row], coef, positions="response"),
    }


def judged(backend, steer: Steer | None, samples: int) -> tuple[float, float]:
    """(mean trait score, mean coherence) of answers under the trait's system prompts."""
    prompts = [
        backend.chat_prompt(sm.system_prompt("pos", k), q)
        for q in QUESTIONS
        for k in range(len(sm.INSTRUCTIONS))
        for _ in range(samples)
    ]
    answers = backend.generate(prompts, max_new_tokens=24, temperature=1.0, seed=0, steer=steer)
    return (
        float(np.mean([trait_score(a) for a in answers])),
        float(np.mean([coherence_score(a) for a in answers])),
    )


def scores(backend, row: int, samples: int, coef: float = -1.0) -> dict[str, tuple]:
    vec = trait_vector(backend)
    plans = settings(backend, vec, row, samples, coef)
    return {name: judged(backend, steer, samples) for name, steer in plans.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--row", type=int, default=3)
    ap.add_argument("--samples", type=int, default=4, help="answers per question and prompt")
    ap.add_argument("--coef", type=float, default=-1.0, help="the add setting's coefficient")
    args = ap.parse_args()
    backend = load_backend(str(sm.semantic_model_dir()), args.backend, dtype="float32")
    n = len(QUESTIONS) * len(sm.INSTRUCTIONS) * args.samples
    print(f"row {args.row}, {n} answers per setting under the trait's system prompt")
    print(f"{'setting':<16} {'trait':>6} {'coherence':>10}")
    for name, (trait, coherence) in scores(backend, args.row, args.samples, args.coef).items():
        print(f"{name:<16} {trait:>6.1f} {coherence:>10.1f}")


if __name__ == "__main__":
    main()
