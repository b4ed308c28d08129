"""`--steer V.pt:LAYER:COEF` and `--ablate V.pt:LAYER` as training-time Edits, checked against
the model (a vector of another model, a row out of range: one line each)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.backends.training import Edits
from pertoken.errors import PertokenError
from pertoken.pipeline.finetune.data import file_sha256
from pertoken.pipeline.steer import build_steer, parse_steer_spec
from pertoken.rows import check_steer_row
from pertoken.vectors import load_vector


@dataclass(frozen=True)
class AblateSpec:
    path: str
    layer: int

    def describe(self) -> str:
        return f"{Path(self.path).name} layer {self.layer}"


def parse_ablate_spec(text: str) -> AblateSpec:
    """'V.pt:LAYER' -> AblateSpec (the path may itself contain colons)."""
    path, sep, layer = text.rpartition(":")
    try:
        if not sep or not path:
            raise ValueError
        return AblateSpec(path, int(layer))
    except ValueError:
        raise PertokenError(
            f"could not read --ablate {text!r}: write it as VECTOR.pt:LAYER, e.g. v.pt:16"
        ) from None


def edit_records(steers: list[str], ablates: list[str]) -> list[dict]:
    """What finetune.json records of each edit: kind, file, its sha256, layer (and coef)."""
    out = []
    for s in map(parse_steer_spec, steers):
        out.append({"kind": "steer", "file": s.path, "sha256": _sha(s.path), "layer": s.layer,
                    "coef": s.coef})  # fmt: skip
    for a in map(parse_ablate_spec, ablates):
        out.append({"kind": "ablate", "file": a.path, "sha256": _sha(a.path), "layer": a.layer})
    return out


def build_edits(backend, steers: list[str], ablates: list[str]) -> Edits:
    """The Edits of --steer and --ablate, each vector checked against `backend`'s model."""
    specs = [parse_steer_spec(s) for s in steers]
    edits = Edits()
    if specs:
        edits.steer = build_steer(backend, specs, positions="all").by_row()
    by_row: dict[int, list[np.ndarray]] = {}
    for a in map(parse_ablate_spec, ablates):
        by_row.setdefault(a.layer, []).append(_direction(backend, a))
    edits.ablate = {row: _orthonormal(dirs) for row, dirs in by_row.items()}
    return edits


def _sha(path: str) -> str:
    if not Path(path).is_file():
        raise PertokenError(f"vector file {path} does not exist: check the path")
    return file_sha256(path)


def _direction(backend, spec: AblateSpec) -> np.ndarray:
    vec = load_vector(spec.path)
    vec.check_model(backend.n_layers, backend.hidden_size, spec.path)
    check_steer_row(spec.layer, backend.n_layers)
    vec.check_nonzero([spec.layer], spec.path)
    return vec.row(spec.layer)  # [hidden]


def _orthonormal(directions: list[np.ndarray]) -> np.ndarray:
    """[k, hidden] orthonormal rows spanning the directions (their projection is then one
    matrix product, whatever their overlap)."""
    q, r = np.linalg.qr(np.stack(directions).astype(np.float64).T)  # [hidden, k]
    keep = np.abs(np.diag(r)) > 1e-8
    return q[:, keep].T.astype(np.float32)
