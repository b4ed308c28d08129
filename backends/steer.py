"""What a Steer does at a row: operators on the residual stream, applied in order.

With u = v / |v| at the row and p = h . u per token:
  add:    h + coef * v
  ablate: h - (p - mean) u          (mean 0: the direction projected out)
  cap:    h - max(0, p - hi) u + max(0, lo - p) u   (p clamped to [lo, hi])
A term may carry a Condition (`when`): it then acts on a sequence only when the mean
projection of the sequence's prompt tokens on another vector passes a threshold.

Every term compiles to Stages, the one form both backends apply: add `add`, then clamp the
projection on `unit` to [lo, hi] (ablate is a cap with lo = hi = mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from pertoken.errors import PertokenError
from pertoken.names import POSITIONS
from pertoken.rows import check_steer_row
from pertoken.vectors import check_coef, check_finite

Positions = Literal["all", "prompt", "response"]
OPS = ("add", "ablate", "cap")

# The largest finite value of each model dtype; bfloat16 shares float32's exponent range.
DTYPE_MAX = {"float16": 65504.0, "bfloat16": 3.3895e38, "float32": 3.4028e38}
# No residual activation comes near float16's largest value; a term past it is a typo.
ACTIVATION_MAX = DTYPE_MAX["float16"]


def _number(x, what: str) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        raise PertokenError(f"{what} must be a number, not {x!r}") from None
    if not math.isfinite(x):
        raise PertokenError(f"{what} is {x}: give a finite number")
    return x


@dataclass(frozen=True)
class Condition:
    """Decide once per sequence, after its prompt: the mean projection (h . u) of its prompt
    tokens at `row` on `vector` must be above `threshold` (below, when above is False)."""

    row: int
    vector: np.ndarray  # [hidden] float32
    threshold: float
    above: bool = True
    name: str = "cond"

    def __post_init__(self):
        object.__setattr__(self, "threshold", _number(self.threshold, "the `when` threshold"))
        check_finite(np.asarray(self.vector), f"the condition vector at layer {self.row}")
        if not np.any(self.vector):
            raise PertokenError(f"the condition vector at layer {self.row} is all zeros")

    @property
    def unit(self) -> np.ndarray:
        v = np.asarray(self.vector, np.float64)
        return (v / np.linalg.norm(v)).astype(np.float32)

    def holds(self, mean_proj: float) -> bool:
        return mean_proj > self.threshold if self.above else mean_proj < self.threshold

    def describe(self) -> str:
        side = ">" if self.above else "<"
        return f"{self.name} L{self.row} {side} {self.threshold:g}"


@dataclass(frozen=True)
class SteerTerm:
    row: int  # row L: acts on the output of block L-1
    vector: np.ndarray  # [hidden] float32
    coef: float = 0.0  # add only
    op: str = "add"
    lo: float | None = None  # cap: lower bound on p (None: none)
    hi: float | None = None  # cap: upper bound on p (None: none)
    mean: float = 0.0  # ablate: the projection left in place (a stored mean, or 0)
    when: Condition | None = None
    name: str = "v"  # the vector's name, for records and trace columns

    def __post_init__(self):
        if self.op not in OPS:
            raise PertokenError(f"unknown steering op {self.op!r}: use one of {', '.join(OPS)}")
        # a NaN coefficient or direction would steer every token into garbage
        check_coef(self.coef)
        check_finite(np.asarray(self.vector), f"the steering vector at layer {self.row}")
        if self.op != "add":
            self._check_projection_op()

    def _check_projection_op(self) -> None:
        if not np.any(self.vector):
            raise PertokenError(
                f"cannot {self.op} along an all-zero vector at layer {self.row}: pick a layer "
                "the vector was extracted at"
            )
        for key in ("lo", "hi", "mean"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, _number(value, f"{self.op} {key}"))
        if self.op == "cap":
            if self.lo is None and self.hi is None:
                raise PertokenError("a cap needs a lower bound, an upper bound or both")
            if self.lo is not None and self.hi is not None and self.hi < self.lo:
                raise PertokenError(f"cap hi {self.hi:g} is below lo {self.lo:g}: swap them")

    def stage(self) -> Stage:
        """This term as one Stage (its condition is decided elsewhere)."""
        if self.op == "add":
            return Stage(np.asarray(self.vector, np.float32) * np.float32(self.coef), None)
        v = np.asarray(self.vector, np.float64)
        unit = (v / np.linalg.norm(v)).astype(np.float32)
        if self.op == "ablate":
            return Stage(None, unit, self.mean, self.mean)
        lo = -math.inf if self.lo is None else self.lo
        hi = math.inf if self.hi is None else self.hi
        return Stage(None, unit, lo, hi)

    def check_range(self, dtype: str) -> None:
        """Refuse numbers that overflow the model's dtype (they would steer to inf) or lie past
        float16's range, far beyond any residual activation."""
        top = DTYPE_MAX.get(dtype, DTYPE_MAX["float32"])
        size = float(np.max(np.abs(np.asarray(self.vector, np.float64)), initial=0.0))
        if self.op == "add" and abs(self.coef) * size >= min(top, ACTIVATION_MAX):
            why = f"overflows {dtype} (largest {top:.3g})" if abs(self.coef) * size >= top else (
                f"is beyond float16's range ({ACTIVATION_MAX:g}), far past any activation"
            )  # fmt: skip
            raise PertokenError(
                f"coefficient {self.coef:g} times the vector at layer {self.row} (max |v| "
                f"{size:.3g}) {why}: sensible coefficients make coef * |v| about 0.25 to 1 "
                "times the residual norm |h| at that layer, as listed in the report card "
                "(pertoken vet)"
            )
        for key in ("lo", "hi", "mean"):
            value = getattr(self, key)
            if self.op != "add" and value is not None and abs(value) >= ACTIVATION_MAX:
                raise PertokenError(
                    f"{self.op} {key} {value:g} at layer {self.row} is beyond any activation "
                    f"(float16's range is {ACTIVATION_MAX:g}): read thresholds off a trace or "
                    "the monitor (proj columns)"
                )


@dataclass(frozen=True)
class Stage:
    """One step at a row: h + add, then the projection on `unit` clamped to [lo, hi]."""

    add: np.ndarray | None  # [hidden] float32
    unit: np.ndarray | None  # [hidden] float32, |unit| = 1
    lo: float = -math.inf
    hi: float = math.inf


@dataclass
class Steer:
    """Steering terms applied in order at their rows (add is the default operator).

    positions: `all` every position; `prompt` the prompt's tokens (prefill only);
    `response` every position whose output predicts an answer token, i.e. the last prompt
    token and every generated token (as the upstream persona-vector steerer does).
    Combine with `then`: `Steer.cap(12, v, hi=4).then(Steer.add(16, w, -2))`.
    """

    terms: list[SteerTerm]
    positions: Positions = "all"
    # conditions decided for one sequence (backends.conditions.decide): one dict per term
    decisions: list[dict] = field(default_factory=list, compare=False)

    @classmethod
    def single(cls, row: int, vector, coef: float, positions: Positions = "all") -> Steer:
        return cls([SteerTerm(row, np.asarray(vector, dtype=np.float32), float(coef))], positions)

    @classmethod
    def add(cls, row: int, vector, coef: float, *, positions: Positions = "all", when=None):
        """h + coef * v at `row`."""
        return cls([_term(row, vector, "add", when, coef=float(coef))], positions)

    @classmethod
    def ablate(cls, row: int, vector, *, mean: float = 0.0, positions="all", when=None):
        """h - (p - mean) u at `row`: the direction projected out (mean 0) or set to a mean."""
        return cls([_term(row, vector, "ablate", when, mean=mean)], positions)

    @classmethod
    def cap(cls, row: int, vector, *, lo=None, hi=None, positions="all", when=None):
        """p = h . u clamped to [lo, hi] at `row` (either bound may be None)."""
        return cls([_term(row, vector, "cap", when, lo=lo, hi=hi)], positions)

    def then(self, other: Steer) -> Steer:
        """This Steer's terms followed by `other`'s (the positions must agree)."""
        if other.positions != self.positions:
            raise PertokenError(
                f"cannot combine steering at {self.positions!r} with {other.positions!r} positions"
            )
        return Steer([*self.terms, *other.terms], self.positions)

    @property
    def adds_only(self) -> bool:
        return all(t.op == "add" for t in self.terms)

    @property
    def conditional(self) -> bool:
        return any(t.when is not None for t in self.terms)

    def by_row(self) -> dict[int, np.ndarray]:
        """Sum of coef * vector per row, each [hidden] float32 (add terms only)."""
        out: dict[int, np.ndarray] = {}
        for t in self.terms:
            if t.op != "add":
                continue
            add = np.asarray(t.vector, dtype=np.float32) * np.float32(t.coef)
            out[t.row] = out[t.row] + add if t.row in out else add
        return out

    def stages(self) -> dict[int, list[Stage]]:
        """Per row, the terms as Stages in order; adds in a run merge (as `by_row` sums them)."""
        out: dict[int, list[Stage]] = {}
        for t in self.terms:
            at, s = out.setdefault(t.row, []), t.stage()
            if s.unit is None and at and at[-1].unit is None:
                at[-1] = Stage(at[-1].add + s.add, None)
            elif s.unit is not None and at and at[-1].unit is None:
                at[-1] = replace(s, add=at[-1].add)  # the add, then this clamp
            else:
                at.append(s)
        return out

    def validate(self, n_layers: int, hidden_size: int, dtype: str = "float32") -> None:
        if self.positions not in POSITIONS:
            raise PertokenError(f"positions must be one of {POSITIONS}, not {self.positions!r}")
        for t in self.terms:
            check_steer_row(t.row, n_layers)
            _check_size(t.vector, hidden_size, "steering")
            t.check_range(dtype)
            if t.when is not None:
                check_steer_row(t.when.row, n_layers)
                _check_size(t.when.vector, hidden_size, "condition")


def _term(row, vector, op, when, **kw) -> SteerTerm:
    return SteerTerm(int(row), np.asarray(vector, dtype=np.float32), op=op, when=when, **kw)


def _check_size(vector, hidden_size: int, what: str) -> None:
    if np.shape(vector) != (hidden_size,):
        raise PertokenError(
            f"{what} vector has shape {tuple(np.shape(vector))} but this model's hidden size "
            f"is {hidden_size}: use a vector extracted from the same model"
        )
