"""Steering: build a Steer from vector files and compare a steered answer with the unsteered one."""

from __future__ import annotations

import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pertoken.backends.base import POSITIONS, Positions, Steer, SteerTerm
from pertoken.errors import PertokenError
from pertoken.pipeline.options import Generation
from pertoken.rows import check_steer_row
from pertoken.vectors import check_coef, load_vector


@dataclass(frozen=True)
class SteerSpec:
    """One steering term as the user wrote it: a vector file, a row and what to do there."""

    path: str
    layer: int
    coef: float = 0.0  # add
    op: str = "add"
    lo: float | None = None  # cap
    hi: float | None = None  # cap
    mean: float = 0.0  # ablate

    def describe(self) -> str:
        where = f"{Path(self.path).name} layer {self.layer}"
        if self.op == "ablate":
            return f"ablate {where}" + (f" to {self.mean:g}" if self.mean else "")
        if self.op == "cap":
            return f"cap {where} to [{_bound(self.lo, '-inf')}, {_bound(self.hi, 'inf')}]"
        return f"{where} coef {self.coef:g}"


def _bound(x: float | None, none: str) -> str:
    return none if x is None else f"{x:g}"


def parse_steer_spec(text: str) -> SteerSpec:
    """'V.pt:LAYER:COEF' -> SteerSpec (the path may itself contain colons)."""
    parts = text.rsplit(":", 2)
    try:
        if len(parts) != 3:
            raise ValueError
        spec = SteerSpec(parts[0], int(parts[1]), float(parts[2]))
    except ValueError:
        raise PertokenError(
            f"could not read --steer {text!r}: write it as VECTOR.pt:LAYER:COEF, e.g. v.pt:16:2.0"
        ) from None
    check_coef(spec.coef)
    return spec


def parse_ablate_spec(text: str) -> SteerSpec:
    """'V.pt:LAYER' (project the direction out) or 'V.pt:LAYER:MEAN' (set it to MEAN)."""
    head, _, last = text.rpartition(":")
    try:
        if head.endswith(".pt") or head.endswith(".safetensors") or ":" not in head:
            return _checked(SteerSpec(head, int(last), op="ablate"))
        path, _, layer = head.rpartition(":")
        return _checked(SteerSpec(path, int(layer), op="ablate", mean=float(last)))
    except ValueError:
        raise PertokenError(
            f"could not read --ablate {text!r}: write it as VECTOR.pt:LAYER (or "
            "VECTOR.pt:LAYER:MEAN to set the projection to a stored mean), e.g. v.pt:16"
        ) from None


def parse_cap_spec(text: str) -> SteerSpec:
    """'V.pt:LAYER:LO:HI', either bound may be empty ('v.pt:12::4.5' caps from above)."""
    parts = text.rsplit(":", 3)
    try:
        if len(parts) != 4 or not (parts[2] or parts[3]):
            raise ValueError
        lo, hi = (float(x) if x.strip() else None for x in parts[2:])
        return _checked(SteerSpec(parts[0], int(parts[1]), op="cap", lo=lo, hi=hi))
    except ValueError:
        raise PertokenError(
            f"could not read --cap {text!r}: write it as VECTOR.pt:LAYER:LO:HI with either "
            "bound empty, e.g. v.pt:12::4.5 to keep the projection at most 4.5"
        ) from None


def _checked(spec: SteerSpec) -> SteerSpec:
    """The spec, after the checks its term makes (finite bounds, hi >= lo)."""
    SteerTerm(spec.layer, np.ones(1, np.float32), op=spec.op, lo=spec.lo, hi=spec.hi,
              mean=spec.mean)  # fmt: skip
    return spec


def parse_specs(steers=(), ablates=(), caps=()) -> list[SteerSpec]:
    """The command line's --steer, --ablate and --cap terms, applied in that order."""
    return (
        [parse_steer_spec(s) for s in steers]
        + [parse_ablate_spec(s) for s in ablates]
        + [parse_cap_spec(s) for s in caps]
    )


def zip_specs(vectors: list[str], layers: list[int], coefs: list[float]) -> list[SteerSpec]:
    """Pair the i-th --vector, --layer and --coef; the three counts must match."""
    if not (len(vectors) == len(layers) == len(coefs)):
        raise PertokenError(
            f"got {len(vectors)} --vector, {len(layers)} --layer and {len(coefs)} --coef: "
            "give one --layer and one --coef for each --vector"
        )
    if not vectors:
        raise PertokenError("nothing to steer with: give --vector, --layer and --coef")
    return [
        SteerSpec(v, int(la), check_coef(c))
        for v, la, c in zip(vectors, layers, coefs, strict=True)
    ]


def build_steer(backend, specs: list[SteerSpec], *, positions: Positions = "response") -> Steer:
    """Load each spec's vector, check it fits `backend`'s model and return one Steer.

    positions defaults to "response" (the answer's tokens), as upstream's steerer does."""
    if positions not in POSITIONS:
        raise PertokenError(f"positions must be one of {', '.join(POSITIONS)}, not {positions!r}")
    terms = []
    for spec in specs:
        vec = load_vector(spec.path)
        vec.check_model(backend.n_layers, backend.hidden_size, spec.path)
        direction = vec.row(spec.layer)  # [hidden]
        check_steer_row(spec.layer, backend.n_layers)
        vec.check_nonzero([spec.layer], spec.path)
        terms.append(
            SteerTerm(spec.layer, direction, spec.coef, op=spec.op, lo=spec.lo, hi=spec.hi,
                      mean=spec.mean, name=Path(spec.path).stem)
        )  # fmt: skip
    steer = Steer(terms, positions)
    steer.validate(backend.n_layers, backend.hidden_size, backend.dtype)
    return steer


@dataclass
class SteerComparison:
    prompt: str  # the user's message
    chat_prompt: str  # what the model was given
    unsteered: str
    steered: str


def steer_compare(
    backend, prompt: str, steer: Steer, generation: Generation, *, system: str | None = None
) -> SteerComparison:
    """Answer `prompt` without and with `steer`, same seed, and return both answers.

    generation: one sample, greedy unless a temperature is given; sampler `model` samples
    with the checkpoint's generation_config, and its temperature when none is given."""
    chat = backend.chat_prompt(system, prompt)
    opts = generation.with_samples(1).keywords(backend, default=0.0)
    plain = backend.generate([chat], **opts)[0]
    steered = backend.generate([chat], steer=steer, **opts)[0]
    return SteerComparison(prompt, chat, plain, steered)


def side_by_side(left: str, right: str, *, titles=("unsteered", "steered"), width=None) -> str:
    """Two texts in two columns (stacked when the terminal is narrower than 80 columns)."""
    width = width or shutil.get_terminal_size((100, 20)).columns
    if width < 80:
        return "\n\n".join(f"--- {t} ---\n{x}" for t, x in zip(titles, (left, right), strict=True))
    col = (width - 3) // 2
    cols = [_wrap(x, col) for x in (left, right)]
    n = max(len(c) for c in cols)
    cols = [c + [""] * (n - len(c)) for c in cols]
    head = f"{titles[0]:<{col}} | {titles[1]}"
    lines = [head, f"{'-' * col}-+-{'-' * col}"]
    lines += [f"{a:<{col}} | {b}".rstrip() for a, b in zip(*cols, strict=True)]
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    out = []
    for para in text.splitlines() or [""]:
        out += textwrap.wrap(para, width, replace_whitespace=False, drop_whitespace=True) or [""]
    return out
