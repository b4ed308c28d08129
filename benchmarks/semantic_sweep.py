"""The whole method on the tiny model with a real trait (tests/semantic_model.py), through the
CLI, printing the figures the semantic end-to-end tests assert on. Run from the repository root:

    python -m benchmarks.semantic_sweep [--backend torch|mlx] [--n-per-question 8]

`pertoken run` extracts a vector with the phrase-bank judge (tests/bank_judge.py), then
`pertoken eval` sweeps layers 2,3 x coefs -2..2 and `pertoken project` reports r.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from click.testing import CliRunner

from pertoken.cli import main
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
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, rows + list(reader)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    return out


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
    print(f"files in {root}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    ap.add_argument("--n-per-question", type=int, default=8)
    main_(ap.parse_args())
