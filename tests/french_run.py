"""The French workflow on a real model, shared by the real-model tests and the benchmark:
generate pos/neg answers with the bundled `french` kit, judge them with the keyword judge,
extract, and score steered answers to eval questions in one generate call."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from pertoken.backends.base import Steer
from pertoken.pipeline.csvio import read_csv, write_csv_atomic
from pertoken.pipeline.extract import extract_vectors
from pertoken.pipeline.generate import generate_csv
from pertoken.pipeline.options import Generation
from pertoken.traits import load_trait
from tests.french_judge import KeywordJudge, coherence_score, french_score


def french_kit(n_questions: int, n_eval: int):
    """The bundled kit with its first questions only."""
    kit = load_trait("french")
    return dataclasses.replace(
        kit, questions=kit.questions[:n_questions], eval_questions=kit.eval_questions[:n_eval]
    )


def judge_file(path: Path) -> None:
    header, rows = read_csv(path)
    write_csv_atomic(path, header, KeywordJudge().judge_rows(rows))


def extraction_run(backend, folder: Path, *, n_questions: int, max_new_tokens: int) -> dict:
    """pos/neg CSVs (greedy, one answer per instruction), judged, and the vectors."""
    kit = french_kit(n_questions, 0)
    csvs = {p: folder / f"french_{p}.csv" for p in ("pos", "neg")}
    for pol, path in csvs.items():
        generate_csv(
            backend,
            kit,
            path,
            Generation(samples=1, max_tokens=max_new_tokens),
            polarity=pol,
            progress=False,
        )
        judge_file(path)
    paths = extract_vectors(
        backend, pos_csv=csvs["pos"], neg_csv=csvs["neg"], trait="french",
        save_dir=folder / "vectors", progress=False,
    )  # fmt: skip
    return {"csvs": csvs, "vectors": paths}


def judged_settings(backend, questions, vector, settings, *, max_new_tokens: int) -> list[dict]:
    """Mean French and coherence scores of greedy answers per (row, coef) setting (row None:
    unsteered), every setting's prompts in one generate call, steering the answer tokens."""
    prompts, steers = [], []
    for row, coef in settings:
        for q in questions:
            prompts.append(backend.chat_prompt(None, q))
            steers.append(
                None if row is None else Steer.single(row, vector[row], coef, positions="response")
            )
    answers = backend.generate(
        prompts, max_new_tokens=max_new_tokens, temperature=0.0, steer=steers
    )
    out, n = [], len(questions)
    for i, (row, coef) in enumerate(settings):
        chunk = answers[i * n : (i + 1) * n]
        out.append(
            {
                "row": row,
                "coef": coef,
                "french": float(np.mean([french_score(a) for a in chunk])),
                "coherence": float(np.mean([coherence_score(a) for a in chunk])),
                "answers": chunk,
            }
        )
    return out
