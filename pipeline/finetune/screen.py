"""`pertoken screen`: before training, which samples of a dataset would move a model along a
persona vector? Per sample, the mean projection of the dataset's answer tokens (`proj_data`),
of the model's own answer to the same prompt (`proj_model`), and their difference `proj_diff`
(the projection difference of Chen et al. 2025). A screen, not a verdict: a high proj_diff says
the data pushes along the direction, not that training will express the trait."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.atomic import write_text_atomic
from pertoken.backends.plan import encode_pairs
from pertoken.errors import PertokenError
from pertoken.lock import output_lock
from pertoken.pipeline.csvio import write_csv_atomic
from pertoken.pipeline.finetune.data import read_chats, split_last_answer
from pertoken.pipeline.finetune.plots import diff_histogram
from pertoken.vectors import PersonaVector

COLUMNS = ["row", "vector", "layer", "proj_data", "proj_model", "proj_diff", "question",
           "model_answer"]  # fmt: skip


@dataclass
class ScreenResult:
    out_path: Path
    rows: int  # samples
    means: dict[str, dict[str, float]]  # vector -> proj_data, proj_model, proj_diff means
    auroc: dict[str, float] | None  # vector -> AUROC of proj_diff for --label
    seconds: float


def screen_dataset(
    backend,
    *,
    data: str | Path,
    vectors: dict[str, PersonaVector],
    layer: int,
    out: str | Path,
    n: int = 1,
    temperature: float | None = None,
    max_new_tokens: int = 200,
    seed: int = 0,
    batch_size: int = 16,
    label: str | None = None,
) -> ScreenResult:
    """Score every chat of `data` (its last assistant turn against the model's own answers).

    n answers per prompt (greedy for n = 1, else temperature 1.0 unless given); label: a
    key of the JSONL lines holding 0/1, whose AUROC against proj_diff is reported. Writes the
    CSV `out`, `out` with .json (means, settings) and .png (histograms)."""
    start = time.perf_counter()
    if n < 1:
        raise PertokenError(f"--n must be at least 1, not {n}")
    chats = read_chats(data)
    labels = _labels(chats, label) if label else None
    units = _units(backend, vectors, layer)  # [V, 1, hidden]
    out = Path(out)
    with output_lock(out):
        pairs = [split_last_answer(backend, c) for c in chats]
        prompts = [p for p, _ in pairs]
        own = _model_answers(backend, prompts, n, temperature, max_new_tokens, seed, batch_size)
        proj_data = _answer_means(backend, prompts, [a for _, a in pairs], units, layer, batch_size)
        proj_model = _answer_means(backend, prompts * n, own, units, layer, batch_size)
        proj_model = np.nanmean(proj_model.reshape(n, len(prompts), -1), axis=0)  # [N, V]
        diff = proj_data - proj_model  # [N, V]
        rows = _rows(chats, list(vectors), layer, proj_data, proj_model, own[: len(prompts)])
        write_csv_atomic(out, COLUMNS, rows)
        means = {name: {"proj_data": float(np.nanmean(proj_data[:, v])),
                        "proj_model": float(np.nanmean(proj_model[:, v])),
                        "proj_diff": float(np.nanmean(diff[:, v]))}
                 for v, name in enumerate(vectors)}  # fmt: skip
        auroc = _auroc(labels, diff, list(vectors)) if labels is not None else None
        summary = {"data": str(data), "samples": len(chats), "layer": layer, "n": n,
                   "max_new_tokens": max_new_tokens, "seed": seed, "means": means,
                   "label": label, "auroc": auroc}  # fmt: skip
        write_text_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        diff_histogram(
            {k: diff[:, v] for v, k in enumerate(vectors)}, layer, out.with_suffix(".png")
        )
    return ScreenResult(out, len(chats), means, auroc, time.perf_counter() - start)


def _units(backend, vectors: dict[str, PersonaVector], layer: int) -> np.ndarray:
    if not vectors:
        raise PertokenError("no vector to screen with: give --vector V.pt")
    out = []
    for name, vec in vectors.items():
        vec.check_model(backend.n_layers, backend.hidden_size, name)
        vec.check_nonzero([layer], name)
        row = vec.row(layer)
        out.append(row / np.linalg.norm(row))
    return np.stack(out)[:, None, :].astype(np.float32)  # [V, 1, hidden]


def _model_answers(backend, prompts, n, temperature, max_new_tokens, seed, batch_size):
    """n answers per prompt, sample k of every prompt first (prompts * n order)."""
    temp = (0.0 if n == 1 else 1.0) if temperature is None else temperature
    seeds = [seed * 1_000_003 + k * len(prompts) + i for k in range(n) for i in range(len(prompts))]
    return backend.generate(prompts * n, max_new_tokens=max_new_tokens, temperature=temp,
                            seeds=seeds, batch_size=batch_size)  # fmt: skip


def _answer_means(backend, prompts, answers, units, layer, batch_size) -> np.ndarray:
    """[N, V] mean projection over each answer's tokens (NaN for an empty answer)."""
    ids, plens = encode_pairs(backend.encode, prompts, answers)
    per_token = backend.token_projections(ids, units, [layer], batch_size=batch_size)
    out = np.full((len(ids), units.shape[0]), np.nan, np.float32)
    for i, (p, plen) in enumerate(zip(per_token, plens)):
        if len(p) > plen:
            out[i] = p[plen:, 0, :-1].mean(0)  # [V]: the answer tokens, each at its position
    return out


def _rows(chats, names, layer, data, model, answers) -> list[dict]:
    out = []
    for i, c in enumerate(chats):
        question = next((m["content"] for m in reversed(c.messages) if m["role"] == "user"), "")
        for v, name in enumerate(names):
            out.append({"row": i, "vector": name, "layer": layer,
                        "proj_data": f"{data[i, v]:.6g}", "proj_model": f"{model[i, v]:.6g}",
                        "proj_diff": f"{data[i, v] - model[i, v]:.6g}", "question": question,
                        "model_answer": answers[i]})  # fmt: skip
    return out


def _labels(chats, key: str) -> np.ndarray:
    """0/1 per chat from the key `key` of its line (numbers 0/1 or JSON true/false)."""
    as_01 = {0.0: 0.0, 1.0: 1.0, "false": 0.0, "true": 1.0}
    values = [as_01.get(c.meta.get(key)) for c in chats]
    bad = [c.where for c, v in zip(chats, values) if v is None]
    if bad:
        raise PertokenError(
            f'{bad[0]} has no 0/1 "{key}" key: --label names a 0/1 key of each line'
        )
    y = np.array(values)
    if len(set(values)) < 2:
        raise PertokenError(f'every line has the same "{key}": --label needs both 0 and 1')
    return y


def _auroc(labels: np.ndarray, diff: np.ndarray, names: list[str]) -> dict[str, float]:
    """How well proj_diff ranks label-1 samples above label-0 ones (0.5: not at all)."""
    from sklearn.metrics import roc_auc_score

    ok = ~np.isnan(diff).any(axis=1)
    return {name: float(roc_auc_score(labels[ok], diff[ok, v])) for v, name in enumerate(names)}
