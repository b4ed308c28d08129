"""The whole method on the tiny model with a real trait (tests/semantic_model.py), through the
CLI, printing the figures the semantic end-to-end tests assert on. Run from the repository root:

    python -m benchmarks.semantic_sweep [--backend torch|mlx] [--n-per-question 8]

`pertoken run` extracts and vets a vector with the phrase-bank judge (tests/bank_judge.py), then
`pertoken eval` sweeps layers 2,3 x coefs -2..2 and `pertoken project` reports r. Last,
`pertoken eval --coefs auto --min-coherence 70` searches rows 2,3, and a sweep of eval's default
size (5 coefficients, 0 to the largest the search tried) runs over the same rows: both print
the answers they judged and the best setting whose coherence held.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from click.testing import CliRunner

from pertoken.cli import main
from pertoken.pipeline.csvio import parse_score, read_table, write_csv_atomic
from tests import semantic_model as sm
from tests.bank_judge import BankJudge


def pertoken(env: dict, *args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args], env=env)
    if result.exit_code != 0:
        raise SystemExit(f"pertoken {' '.join(map(str, args))} failed:\n{result.output}")
    return result.output


def merged_csv(run_dir: Path, out: Path) -> Path:
    rows, header = [], None
    for path in sorted(run_dir.glob(f"{sm.TRAIT}_*_instruct.csv")):
        header, more = read_table(path)
        rows += more
    return write_csv_atomic(out, header, rows)


def main_(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="pertoken-semantic-"))
    model = sm.semantic_model_dir()
    env = {"OPENAI_API_KEY": "sk-local-dummy", "PERTOKEN_CACHE_DIR": str(root / "cache")}
    gen = ["--max-new-tokens", 24, "--backend", args.backend]
    with BankJudge() as judge:
        judged = ["--base-url", judge.base_url]
        kit = sm.write_kit(root / "kit")
        print(
            pertoken(
                env,
                "run",
                "--model",
                model,
                "--trait",
                kit,
                "--out",
                root / "runs",
                "--n-per-question",
                2,
                *gen,
                *judged,
            )
        )
        (vector,) = (root / "runs").rglob(f"{sm.TRAIT}_response_avg_diff.pt")
        print(
            pertoken(
                env,
                "eval",
                "--model",
                model,
                "--trait",
                kit,
                "--vector",
                vector,
                "--layers",
                "2,3",
                "--coefs",
                "-2,-1,0,1,2",
                "--out",
                root / "eval",
                "--n-per-question",
                args.n_per_question,
                *gen,
                *judged,
            )
        )
        both = merged_csv(vector.parent.parent, root / "both.csv")
        print(
            pertoken(
                env,
                "project",
                both,
                "--model",
                model,
                "--vector",
                vector,
                "--layer",
                3,
                "--backend",
                args.backend,
            )
        )
        compare_search(env, model, kit, vector, root, judge, args)
    print(f"files in {root}")


def _judged(folder: Path) -> int:
    """Distinct answers (eval files the unsteered ones under every layer; they count once)."""
    _, rows = read_table(folder / "answers.csv")
    return len(
        {
            (r["layer"] if float(r["coef"]) else "", r["coef"], r["question_id"], r["sample"])
            for r in rows
        }
    )


def _best_held(folder: Path, floor: float) -> str:
    _, rows = read_table(folder / "summary.csv")
    steered = [(parse_score(r[sm.TRAIT]), parse_score(r["coherence"]), r) for r in rows]
    steered = [(t, c, r) for t, c, r in steered if float(r["coef"]) > 0 and None not in (t, c)]
    held = [(t, r) for t, c, r in steered if c >= floor]
    if not held:
        return "none held coherence"
    _, b = max(held, key=lambda x: x[0])
    return (
        f"layer {b['layer']} coef {b['coef']}: {sm.TRAIT} {b[sm.TRAIT]}, coherence {b['coherence']}"
    )


def compare_search(env, model, kit, vector, root: Path, judge, args, floor: float = 70) -> None:
    """`eval --coefs auto` against a 5-coefficient sweep over the same rows and range."""
    common = ["--model", model, "--trait", kit, "--vector", vector, "--layers", "2,3",
              "--n-per-question", args.n_per_question, "--max-new-tokens", 24,
              "--backend", args.backend, "--base-url", judge.base_url]  # fmt: skip
    calls = len(judge.requests)
    print(pertoken(env, "eval", *common, "--coefs", "auto", "--min-coherence", floor,
                   "--out", root / "auto"))  # fmt: skip
    auto_calls, calls = len(judge.requests) - calls, len(judge.requests)
    search = json.loads((root / "auto" / "search.json").read_text())
    top = max(p["coef"] for p in search["points"])
    grid = ",".join(f"{top * k / 4:.3g}" for k in range(5))
    pertoken(env, "eval", *common, "--coefs", grid, "--out", root / "grid")
    grid_calls = len(judge.requests) - calls
    b = search["best"]
    print(
        f"auto search: {_judged(root / 'auto')} answers judged ({auto_calls} judge calls); "
        f"best layer {b['layer']} coef {b['coef']:g}: {sm.TRAIT} {b['trait']:.2f}, coherence "
        f"{b['coherence']:.2f}; unsteered {sm.TRAIT} {search['unsteered']['trait']:.2f}"
    )
    print(
        f"sweep {grid}: {_judged(root / 'grid')} answers judged ({grid_calls} judge calls); "
        f"best with coherence >= {floor:g}: {_best_held(root / 'grid', floor)}"
    )


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--n-per-question", type=int, default=8)
    main_(ap.parse_args())
