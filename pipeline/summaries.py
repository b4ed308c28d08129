"""Per-sample summaries of the kept pairs, kept beside the vectors so vet and probe never rerun
the model: `{trait}_summaries.npz` with, per kept sample, the residual mean of each row.

Arrays: one `[N, n_layers + 1, hidden]` float16 array per summary kind present (extract keeps
`response_avg`; vet adds a prompt kind when it vets such a vector), and per sample `label`
(1 pos, 0 neg), `question` (i), `instruction` (k) and `sample` (j). Sample p < N/2 is the
positive side of kept pair p, sample p + N/2 its negative side. `meta` holds a JSON string
(model, backend, dtype, trait, threshold).
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.atomic import atomic_path

KINDS = ("response_avg", "prompt_avg", "prompt_last")
_KEYS = ("label", "question", "instruction", "sample")


@dataclass
class SampleSummaries:
    states: dict[str, np.ndarray]  # kind -> [N, n_layers + 1, hidden] float16
    label: np.ndarray  # [N] int8: 1 for a positive sample, 0 for a negative one
    question: np.ndarray  # [N] int32: question index i
    instruction: np.ndarray  # [N] int32: instruction pair k
    sample: np.ndarray  # [N] int32: sample j
    meta: dict = field(default_factory=dict)

    @property
    def pair_keys(self) -> list[tuple[int, int, int]]:
        """(i, k, j) of each kept pair, in file order."""
        n = len(self.label) // 2
        return list(zip(*(a[:n].tolist() for a in (self.question, self.instruction, self.sample))))

    def shape(self) -> tuple[int, int]:
        """(n_layers + 1, hidden) of the stored states."""
        return next(iter(self.states.values())).shape[1:]


def summaries_path(save_dir: str | Path, trait: str) -> Path:
    return Path(save_dir) / f"{trait}_summaries.npz"


def from_pairs(
    keys: list[tuple[int, int, int]], pos: dict, neg: dict, meta: dict
) -> SampleSummaries:
    """Stack per-kind pos and neg states ([P, R, H] each) of the pairs `keys` into one file."""
    n = len(keys)
    cols = np.asarray(keys, dtype=np.int32).reshape(n, 3)  # [P, 3]: i, k, j
    return SampleSummaries(
        states={k: half(np.concatenate([pos[k], neg[k]])) for k in pos},
        label=np.r_[np.ones(n, np.int8), np.zeros(n, np.int8)],
        question=np.tile(cols[:, 0], 2),
        instruction=np.tile(cols[:, 1], 2),
        sample=np.tile(cols[:, 2], 2),
        meta=meta,
    )


def half(a: np.ndarray) -> np.ndarray:
    """float16, clipped to its range so a huge activation stays finite."""
    big = float(np.finfo(np.float16).max)
    return np.clip(a, -big, big).astype(np.float16)


def save_summaries(s: SampleSummaries, path: str | Path) -> Path:
    """Write the npz beside and rename, so an interruption never leaves half a file."""
    path = Path(path)
    arrays = {k: getattr(s, k) for k in _KEYS} | dict(s.states)
    with atomic_path(path) as tmp, tmp.open("xb") as f:
        np.savez(f, meta=np.array(json.dumps(s.meta)), **arrays)
    return path


def load_summaries(path: str | Path) -> SampleSummaries | None:
    """The stored summaries, or None when the file is missing or unreadable (recompute them)."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            states = {k: z[k] for k in KINDS if k in z.files}
            cols = {k: z[k] for k in _KEYS}
            meta = json.loads(str(z["meta"]))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None
    if not states:
        return None
    return SampleSummaries(states, **cols, meta=meta)


def collect(backend, rows: list[dict], *, keep: tuple[str, ...], batch_size: int = 8, bar=None):
    """({kind: mean over rows [R, H] float64} for every kind, {kind: per-row [N, R, H] float16}
    for the kinds in `keep`), a batch at a time so memory holds one batch in float32; `bar`
    (tqdm) counts the rows as each batch is done."""
    sums = {k: 0.0 for k in KINDS}
    kept: dict[str, list[np.ndarray]] = {k: [] for k in keep}
    chunk = max(batch_size, 1)  # one batch: the bar moves on slow backends too
    for b in range(0, len(rows), chunk):
        part = rows[b : b + chunk]
        s = backend.summaries(
            [r["prompt"] for r in part], [r["answer"] for r in part], batch_size=batch_size
        )
        for k in KINDS:
            arr = np.asarray(getattr(s, k))  # [n, R, H] float32
            sums[k] = sums[k] + arr.astype(np.float64).sum(axis=0)
            if k in kept:
                kept[k].append(half(arr))
        if bar is not None:
            bar.update(len(part))
    means = {k: v / len(rows) for k, v in sums.items()}
    return means, {k: np.concatenate(v) for k, v in kept.items()}
