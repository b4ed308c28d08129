"""The finetuning example of the README on the tiny model with a real trait
(tests/semantic_model.py), through the CLI, printing the table the slow tests assert on. Run
from the repository root:

    python -m benchmarks.finetune_shift [--backend torch|mlx] [--n 48]

A paternalism vector is extracted from the model's own trait and helpful answers; `screen` scores
a mixed dataset (AUROC of proj_diff for trait vs helpful answers); `finetune` trains LoRA on
trait answers (no system prompt in the data), on helpful answers, and on trait answers with
preventative steering; `shift --judge` (the phrase-bank judge, tests/bank_judge.py) measures each
model's shift along the vector and its judged trait.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from click.testing import CliRunner

from pertoken.cli import main
from tests import finetune_semantic as fs
from tests.bank_judge import BankJudge


def pertoken(env: dict):
    def invoke(*args) -> str:
        result = CliRunner().invoke(main, [str(a) for a in args], env=env)
        if result.exit_code != 0:
            raise SystemExit(f"pertoken {' '.join(map(str, args))} failed:\n{result.output}")
        return result.output

    return invoke


def table(res: dict) -> str:
    key = (fs.LAYER, "prompt_last")
    avg = (fs.LAYER, "response_avg")
    lines = [
        f"| model | judged trait | shift L{fs.LAYER} prompt_last | shift L{fs.LAYER} "
        "response_avg | final loss |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, label in ((res["base"], "base"), ("trait", "finetuned on trait answers"),
                        ("prevented", f"same, --steer coef {fs.PREVENT_COEF:g}"),
                        ("anti", "finetuned on helpful answers")):  # fmt: skip
        s, rec = res["shifts"][name], res["records"].get(name)
        loss = f"{rec['epoch_loss'][-1]:.3f}" if rec else "-"
        lines.append(f"| {label} | {res['scores'][name]:.1f} | {s[key]:.3f} | {s[avg]:.3f} | "
                     f"{loss} |")  # fmt: skip
    auroc = res["screen"]["auroc"]["v"]
    diff = res["screen"]["means"]["v"]["proj_diff"]
    lines.append(f"\nscreen: AUROC of proj_diff (trait vs helpful answers) {auroc:.3f}, "
                 f"dataset mean proj_diff {diff:.3f}")  # fmt: skip
    lines += [f"r(shift at {k}, judged trait), all models = {v:.3f}"
              for k, v in res["r"].items() if v is not None]  # fmt: skip
    for row, kind in (key, avg):
        r = fs.pearson_unsteered(res, (row, kind))
        lines.append(f"r(shift at {row}/{kind}, judged trait), base + unsteered finetunes "
                     f"= {r:.3f}")  # fmt: skip
    return "\n".join(lines)


def main_(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="pertoken-finetune-"))
    env = {"OPENAI_API_KEY": "sk-local-dummy", "PERTOKEN_CACHE_DIR": str(root / "cache")}
    with BankJudge() as judge:
        res = fs.workflow(root, pertoken(env), judge.base_url, args.backend, args.n)
    print(f"backend {args.backend}, {args.n} training chats per dataset, files in {root}\n")
    print(table(res))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    parser.add_argument("--n", type=int, default=48, help="Training chats per dataset.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads.")
    main_(parser.parse_args())
