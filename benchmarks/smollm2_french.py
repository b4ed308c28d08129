"""Does the report card's suggestion steer a real model? SmolLM2-135M-Instruct, French kit.

Generates the French kit's pos/neg answers (greedy, one per instruction), judges them with the
keyword judge (tests/french_judge.py), extracts, vets with the causal measure and its judged
check (--judged N; 0 for the causal measure alone), then judges greedy steered answers to the
kit's eval questions (never seen by extraction or vet) at the causal suggestion, at the card's
final suggestion (the judged check's, when it ran), at the row separation alone would suggest,
and unsteered, all in one generate call. Prints the figures and writes them to
OUT/figures.json. Rerunning reuses the generations.

    python -m benchmarks.smollm2_french --out /tmp/smollm2-french [--questions 20 --eval 10]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from pertoken.backends.torch.backend import TorchBackend
from pertoken.pipeline.vet.stage import CausalCheck, vet_vector
from pertoken.vectors import load_vector
from tests.french_judge import KeywordJudge
from tests.french_run import extraction_run, french_kit, judged_settings
from tests.real_model import fetch_smollm2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/smollm2-french")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--eval", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--causal-pairs", type=int, default=3)
    ap.add_argument("--judged", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gguf, why = fetch_smollm2()
    if gguf is None:
        raise SystemExit(why)
    out = Path(args.out)
    b = TorchBackend.load(str(gguf), dtype="float32", device="cpu")
    t0 = time.perf_counter()
    run = extraction_run(b, out, n_questions=args.questions, max_new_tokens=args.tokens)
    t1 = time.perf_counter()
    card = vet_vector(
        run["vectors"]["response_avg"], pos_csv=run["csvs"]["pos"], neg_csv=run["csvs"]["neg"],
        backend=b, causal=CausalCheck(pairs=args.causal_pairs, judged=args.judged,
                                      judge=KeywordJudge()),
    )  # fmt: skip
    t2 = time.perf_counter()
    vec = load_vector(run["vectors"]["response_avg"]).data
    by_auroc = max(range(2, b.n_layers), key=lambda r: card.rows[r].auroc)
    causal = card.causal["suggestion"]
    settings = [(None, 0.0), (causal["row"], causal["coef"])]
    if (card.suggested_row, card.suggested_coef) != settings[-1]:
        settings.append((card.suggested_row, card.suggested_coef))  # the judged check's pick
    settings += [(by_auroc, card.rows[by_auroc].coef[k]) for k in ("0.5", "1")]
    questions = french_kit(0, args.eval).eval_questions
    judged = judged_settings(b, questions, vec, settings, max_new_tokens=args.tokens)
    t3 = time.perf_counter()
    figures = {
        "suggested": {"row": card.suggested_row, "ratio": card.suggested_ratio,
                      "coef": card.suggested_coef,
                      "by": "judged" if card.causal.get("judged_pick") else "causal"},
        "causal_suggestion": causal,
        "warnings": card.warnings,
        "card_judged": card.judged,
        "auroc": [round(r.auroc, 3) for r in card.rows],
        "gain": {r.row: r.gain for r in card.rows if r.gain},
        "cost": {r.row: r.cost for r in card.rows if r.cost},
        "trait_cost": {r.row: r.trait_cost for r in card.rows if r.trait_cost},
        "distinct": {r.row: r.distinct for r in card.rows if r.distinct is not None},
        "judged": [{k: v for k, v in j.items() if k != "answers"} for j in judged],
        "examples": {f"{j['row']}@{j['coef']:.3g}": j["answers"][:2] for j in judged},
        "seconds": {"extraction": t1 - t0, "vet": t2 - t1, "judged": t3 - t2},
    }  # fmt: skip
    (out / "figures.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    for j in figures["judged"]:
        print(f"row {j['row']} coef {j['coef']:.3g}: French {j['french']:.0f}, "
              f"coherence {j['coherence']:.0f}")  # fmt: skip
    keys = ("suggested", "causal_suggestion", "warnings", "seconds")
    print(json.dumps({k: figures[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
