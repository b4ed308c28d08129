"""`pertoken screen`: before training, which samples of a dataset would move a model along a
persona vector? Per sample, the mean projection of the dataset's answer tokens (`proj_data`),
of the model's own answer to the same prompt (`proj_model`), and their difference `proj_diff`
(the projection difference of Chen et al. 2025). A screen, not a verdict: a high proj_diff says
the data pushes along the direction, not that training will express the trait."""

from __future__ import annotations

import functools
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
from pertoken.pipeline.finetune.data import Chat, read_chats, split_last_answer
from pertoken.pipeline.finetune.plots import diff_histogram
from pertoken.pipeline.options import Generation
from pertoken.pipeline.trace.steer import Directions
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


SHARD_BATCHES = 4  # samples go out in shards of this many batches (the same with any pool)


def screen_dataset(
    backend,
    generation: Generation,
    *,
    data: str | Path,
    directions: Directions,
    out: str | Path,
    label: str | None = None,
    pool=None,
) -> ScreenResult:
    """Score every chat of `data` (its last assistant turn against the model's own answers)
    along `directions` (screen_directions: the vectors' unit rows at one layer).

    generation: answers per prompt (greedy for one, else temperature 1.0 unless given), their
    tokens, seed and batch size; label: a key of the JSONL lines holding 0/1, whose AUROC
    against proj_diff is reported. Writes the CSV `out`, `out` with .json (means, settings)
    and .png (histograms). pool: a distributed.ModelPool whose actors score the shards
    (`backend` is then its ModelInfo); the shards are the same either way, so the files are
    too."""
    from pertoken.pipeline.distributed import map_shards

    start, g = time.perf_counter(), generation
    batch_size = check_generation(g)
    chats = read_chats(data)
    labels = _labels(chats, label) if label else None
    vectors, layer = directions.names, directions.rows[0]
    work = _Work(directions, g.keywords(backend), g.samples, len(chats), batch_size)
    size = batch_size * SHARD_BATCHES
    shards = [(i, [c.messages for c in chats[i : i + size]]) for i in range(0, len(chats), size)]
    out = Path(out)
    with output_lock(out):
        parts = [None] * len(shards)
        for k, part in map_shards(work, shards, backend=backend, pool=pool):
            parts[k] = part
        proj_data = np.concatenate([p[0] for p in parts])  # [N, V]
        proj_model = np.concatenate([p[1] for p in parts])  # [N, V]
        own = [a for p in parts for a in p[2]]
        diff = proj_data - proj_model  # [N, V]
        rows = _rows(chats, list(vectors), layer, proj_data, proj_model, own)
        write_csv_atomic(out, COLUMNS, rows)
        means = {name: {"proj_data": float(np.nanmean(proj_data[:, v])),
                        "proj_model": float(np.nanmean(proj_model[:, v])),
                        "proj_diff": float(np.nanmean(diff[:, v]))}
                 for v, name in enumerate(vectors)}  # fmt: skip
        auroc = _auroc(labels, diff, list(vectors)) if labels is not None else None
        summary = {"data": str(data), "samples": len(chats), "layer": layer, "n": g.samples,
                   "max_new_tokens": g.max_tokens, "seed": g.seed, "means": means,
                   "label": label, "auroc": auroc}  # fmt: skip
        write_text_atomic(out.with_suffix(".json"), json.dumps(summary, indent=2) + "\n")
        diff_histogram(
            {k: diff[:, v] for v, k in enumerate(vectors)}, layer, out.with_suffix(".png")
        )
    return ScreenResult(out, len(chats), means, auroc, time.perf_counter() - start)


def check_generation(g: Generation) -> int:
    """The batch size (default 16), after checking the counts: before any model work."""
    if g.samples < 1:
        raise PertokenError(f"--n must be at least 1, not {g.samples}")
    batch_size = 16 if g.batch_size is None else g.batch_size
    if batch_size < 1:
        raise PertokenError(f"--batch-size must be at least 1, not {batch_size}")
    return batch_size


def screen_directions(backend, vectors: dict[str, PersonaVector], layer: int) -> Directions:
    """The vectors' unit rows at `layer`, checked against the model."""
    if not vectors:
        raise PertokenError("no vector to screen with: give --vector V.pt")
    out = []
    for name, vec in vectors.items():
        vec.check_model(backend.n_layers, backend.hidden_size, name)
        vec.check_nonzero([layer], name)
        row = vec.row(layer)
        out.append(row / np.linalg.norm(row))
    units = np.stack(out)[:, None, :].astype(np.float32)  # [V, 1, hidden]
    return Directions(list(vectors), units, [layer])


@dataclass(frozen=True)
class _Work:
    """One shard's scoring: what it needs besides the model; sent as it is to pool actors."""

    directions: Directions  # one layer
    opts: dict  # backend.generate's keywords (Generation.keywords)
    n: int  # answers per prompt
    total: int  # samples in the whole dataset: the seeds do not depend on the shards
    batch_size: int

    def __call__(self, backend, shard) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(proj_data [m, V], proj_model [m, V] over the n answers, the first answers)."""
        first, messages = shard
        pairs = [split_last_answer(backend, Chat("", m)) for m in messages]
        prompts, m = [p for p, _ in pairs], len(pairs)
        # n answers per prompt, sample k of every prompt first (prompts * n order)
        opts = dict(self.opts)
        seed = opts.pop("seed")
        seeds = [seed * 1_000_003 + k * self.total + first + i
                 for k in range(self.n) for i in range(m)]  # fmt: skip
        own = backend.generate(prompts * self.n, seeds=seeds, batch_size=self.batch_size, **opts)
        d = self.directions
        means = functools.partial(_answer_means, backend, units=d.units, layer=d.rows[0],
                                  batch_size=self.batch_size)  # fmt: skip
        proj_data = means(prompts, [a for _, a in pairs])
        proj_model = np.nanmean(means(prompts * self.n, own).reshape(self.n, m, -1), axis=0)
        return proj_data, proj_model, own[:m]


def _answer_means(backend, prompts, answers, *, units, layer, batch_size) -> np.ndarray:
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
