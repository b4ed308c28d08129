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
# Preventative steering as the README advises: from the coefficient at which the steered base
# model is as paternalistic as the data (2 here: ~87 of 100), raised until the finetuned
# model's judged trait stops rising (2 keeps most of the rise; 4 prevents it).
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


# The finetune settings of the tests and the benchmark: few steps on a 64-wide model.
FINETUNE = ["--method", "lora", "--rank", 8, "--lr", 3e-3, "--epochs", 2, "--batch-size", 8]


def workflow(root: Path, cli, judge_url: str, backend: str = "torch", n: int = 48) -> dict:
    """Screen a mixed dataset, finetune on trait answers (plain and prevented) and on
    anti-trait answers, then `shift --judge`: returns the screen summary, the finetune
    records, the shift table {model: {(row, kind): shift}} and the judged scores."""
    from pertoken.backends import load_backend
    from pertoken.pipeline.csvio import parse_score, read_table

    model = sm.semantic_model_dir()
    vec = extract_vector(load_backend(str(model), backend), root / "v.pt")
    kit = sm.write_kit(root / "kit")
    mixed = write_mixed(root / "mixed.jsonl", 12, seed=3)
    common = ["--model", model, "--backend", backend]
    cli("screen", *common, "--vector", vec, "--layer", LAYER, "--data", mixed,
        "--out", root / "screen.csv", "--label", "trait", "--max-new-tokens", 24)  # fmt: skip
    data = {"trait": write_data(root / "trait.jsonl", sm.TRAIT_BANK, n, seed=1),
            "anti": write_data(root / "anti.jsonl", sm.ANTI_BANK, n, seed=2)}  # fmt: skip
    runs = {"trait": (data["trait"], []), "anti": (data["anti"], []),
            "prevented": (data["trait"], ["--steer", f"{vec}:{LAYER}:{PREVENT_COEF}"])}  # fmt: skip
    records = {}
    for name, (path, extra) in runs.items():
        cli("finetune", *common, "--data", path, "--out", root / name, *FINETUNE, *extra)
        records[name] = json.loads((root / name / "finetune.json").read_text())
    finetuned = [x for name in runs for x in ("--finetuned", root / name)]
    printed = cli("shift", "--base", model, *finetuned, "--backend", backend, "--trait", kit,
                  "--vector", vec, "--layers", LAYER, "--out", root / "shift", "--base-url",
                  judge_url, "--n-per-question", 8, "--max-new-tokens", 24)  # fmt: skip
    _, rows = read_table(root / "shift" / "shift.csv")
    shifts: dict[str, dict] = {}
    for r in rows:
        shifts.setdefault(r["model"], {})[(int(r["row"]), r["kind"])] = float(r["shift"])
    _, table = read_table(root / "shift" / "scores.csv")
    return {
        "screen": json.loads((root / "screen.json").read_text()),
        "records": records,
        "shifts": shifts,
        "scores": {r["model"]: parse_score(r[sm.TRAIT]) for r in table},
        "r": json.loads((root / "shift" / "shift.json").read_text())["r"],
        "base": model.name,
        "printed": printed,
    }


def pearson_unsteered(res: dict, key: tuple[int, str]) -> float:
    """r between shift and judged trait over the base and the models finetuned without edits
    (the paper's setting: models that differ only in their data)."""
    names = [res["base"], "trait", "anti"]
    x = [res["shifts"][n][key] for n in names]
    return float(np.corrcoef(x, [res["scores"][n] for n in names])[0, 1])
