"""`--steer V.pt:LAYER:COEF` and `--ablate V.pt:LAYER` as the Steer that acts in every training
forward, built and checked as everywhere else in pertoken (a vector of another model, a row out
of range: one line each)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pertoken.backends.steer import Steer, SteerTerm
from pertoken.errors import PertokenError
from pertoken.pipeline.finetune.data import file_sha256
from pertoken.pipeline.steer import SteerSpec, build_steer, parse_ablate_spec, parse_steer_spec


def _ablate_spec(text: str) -> SteerSpec:
    spec = parse_ablate_spec(text)
    if spec.mean:
        raise PertokenError(
            f"finetune --ablate {text!r} sets a mean: training projects the direction out "
            "(CAFT), so write it as VECTOR.pt:LAYER"
        )
    return spec


def edit_records(steers: list[str], ablates: list[str]) -> list[dict]:
    """What finetune.json records of each edit: kind, file, its sha256, layer (and coef)."""
    out = []
    for s in map(parse_steer_spec, steers):
        out.append({"kind": "steer", "file": s.path, "sha256": _sha(s.path), "layer": s.layer,
                    "coef": s.coef})  # fmt: skip
    for a in map(_ablate_spec, ablates):
        out.append({"kind": "ablate", "file": a.path, "sha256": _sha(a.path), "layer": a.layer})
    return out


def training_steer(backend, steers: list[str], ablates: list[str]) -> Steer | None:
    """The Steer of --ablate then --steer at every position, each vector checked against
    `backend`'s model; None when there is neither. At a row the ablations come first, so the
    preventative add is not projected away."""
    specs = [_ablate_spec(a) for a in ablates] + [parse_steer_spec(s) for s in steers]
    if not specs:
        return None
    steer = build_steer(backend, specs, positions="all")
    return Steer(_span_ablations(steer.terms), "all")


def _span_ablations(terms: list[SteerTerm]) -> list[SteerTerm]:
    """Several directions ablated at one row become orthonormal directions spanning them: in
    turn they then project out the whole span, whatever the directions' overlap."""
    by_row: dict[int, list[SteerTerm]] = {}
    for t in terms:
        if t.op == "ablate":
            by_row.setdefault(t.row, []).append(t)
    out = []
    for row, group in by_row.items():
        if len(group) == 1:
            out += group
            continue
        name = "+".join(t.name for t in group)
        units = _orthonormal([t.vector for t in group])  # [k, hidden]
        out += [SteerTerm(row, u, op="ablate", name=name) for u in units]
    return out + [t for t in terms if t.op != "ablate"]


def _sha(path: str) -> str:
    if not Path(path).is_file():
        raise PertokenError(f"vector file {path} does not exist: check the path")
    return file_sha256(path)


def _orthonormal(directions: list[np.ndarray]) -> np.ndarray:
    """[k, hidden] orthonormal rows spanning the directions (k drops where they coincide)."""
    q, r = np.linalg.qr(np.stack(directions).astype(np.float64).T)  # [hidden, k]
    keep = np.abs(np.diag(r)) > 1e-8
    return q[:, keep].T.astype(np.float32)
