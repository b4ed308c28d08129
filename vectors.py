"""Persona vector files: `[n_layers + 1, hidden]` float32 tensors saved with torch.save."""

from __future__ import annotations

import json
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.atomic import atomic_path, write_text_atomic
from pertoken.errors import PertokenError

# meta key set on import when n_layers was read from the file, not given by the user
ROWS_FROM_FILE = "n_layers_from_file"


@dataclass
class PersonaVector:
    """A persona vector: data [n_layers + 1, hidden] float32, finite (checked as load_vector
    checks a file), and its sidecar's metadata."""

    data: np.ndarray  # [n_layers + 1, hidden] float32
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.data = checked_data(self.data, "PersonaVector")

    @property
    def n_layers(self) -> int:
        return self.data.shape[0] - 1

    @property
    def hidden_size(self) -> int:
        return self.data.shape[1]

    def row(self, layer: int) -> np.ndarray:
        """The direction at row `layer`, [hidden] float32."""
        if not 0 <= layer <= self.n_layers:
            raise PertokenError(f"layer {layer} is outside 0..{self.n_layers} for this vector")
        return self.data[layer]

    # ------------------------------------------------------------------ arithmetic
    # As repeng's ControlVector: v + w, v - w, 2 * v, v / 2, -v; the result is a new vector.
    __array_ufunc__ = None  # numpy scalars defer to these methods (np.float32(2) * v)

    def __add__(self, other: PersonaVector) -> PersonaVector:
        return self._combine(other, np.add)

    def __sub__(self, other: PersonaVector) -> PersonaVector:
        return self._combine(other, np.subtract)

    def __mul__(self, coef: float) -> PersonaVector:
        if not isinstance(coef, numbers.Real):
            return NotImplemented
        coef = check_coef(coef)
        return self._result(self.data * np.float64(coef), f"v * {coef:g}")

    __rmul__ = __mul__

    def __truediv__(self, coef: float) -> PersonaVector:
        if not isinstance(coef, numbers.Real):
            return NotImplemented
        if coef == 0:
            raise ZeroDivisionError("cannot divide a persona vector by zero")
        coef = check_coef(coef)
        return self._result(self.data / np.float64(coef), f"v / {coef:g}")

    def __neg__(self) -> PersonaVector:
        return self * -1

    def normalized(self) -> PersonaVector:
        """Every row scaled to unit length; zero rows (rows never extracted) stay zero."""
        norm = np.linalg.norm(self.data, axis=1, keepdims=True)  # [n_layers + 1, 1]
        unit = np.divide(self.data, norm, out=np.zeros(self.data.shape, np.float32), where=norm > 0)
        return PersonaVector(unit, dict(self.meta))

    def _combine(self, other, op) -> PersonaVector:
        if not isinstance(other, PersonaVector):
            return NotImplemented
        if other.data.shape != self.data.shape:
            raise PertokenError(
                f"cannot combine vectors of shapes {list(self.data.shape)} and "
                f"{list(other.data.shape)}: use vectors extracted from the same model"
            )
        agreed = {k: v for k, v in self.meta.items() if k in other.meta and other.meta[k] == v}
        data = op(self.data.astype(np.float64), other.data)
        return self._result(data, f"v {'+' if op is np.add else '-'} w", agreed)

    def _result(self, data: np.ndarray, what: str, meta: dict | None = None) -> PersonaVector:
        """A new vector of float64 `data`; a clear error when it does not fit in float32."""
        with np.errstate(over="ignore"):
            data = data.astype(np.float32)  # [n_layers + 1, hidden]
        if not np.isfinite(data).all():
            raise PertokenError(
                f"{what} overflows float32 (|values| above 3.4e38): use a smaller coefficient"
            )
        return PersonaVector(data, dict(self.meta) if meta is None else meta)

    def check_model(self, n_layers: int, hidden_size: int, path: str | Path = "vector") -> None:
        """A clear error when the vector was made for another model.

        A vector imported from a control vector file that did not give the model's size (repeng
        counts only the layers it holds) is padded with zero rows instead, with a note."""
        if self.data.shape == (n_layers + 1, hidden_size):
            return
        if self.meta.get(ROWS_FROM_FILE) and self.hidden_size == hidden_size:
            if self.n_layers < n_layers:
                self._pad(n_layers, path)
                return
        hint = (
            f"import it again with --n-layers {n_layers}"
            if "imported_from" in self.meta
            else "it was extracted from another model; extract one for this model"
        )
        raise PertokenError(
            f"{path} has shape {list(self.data.shape)} but the model needs "
            f"[{n_layers + 1}, {hidden_size}] (n_layers+1, hidden): {hint}"
        )

    def _pad(self, n_layers: int, path) -> None:
        old = self.n_layers
        pad = np.zeros((n_layers - old, self.hidden_size), np.float32)  # the rows it lacks
        self.data = np.concatenate([self.data, pad])  # [n_layers + 1, hidden]
        note(
            f"{path} holds rows 0..{old} of an imported control vector; rows "
            f"{old + 1}..{n_layers} are padded with zeros to fit this model "
            f"(`pertoken import --n-layers {n_layers}` records the model's size)"
        )

    def check_nonzero(self, rows: list[int], name: str | Path = "vector") -> None:
        """One rule for steering and monitoring: a row of zeros has no direction to use."""
        for r in rows:
            if not np.any(self.row(r)):
                raise PertokenError(
                    f"{name} is all zeros at layer {r}: it has no direction there (a file "
                    "holding only some layers leaves the others zero); pick another layer"
                )


def note(message: str) -> None:
    """One informational line on stderr (progress bars and errors go there too)."""
    print(f"note: {message}", file=sys.stderr)


def save_vector(vector: PersonaVector, path: str | Path) -> Path:
    """Write the `.pt` tensor and, when meta is set, a `.json` sidecar beside it."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(torch.from_numpy(np.ascontiguousarray(vector.data, dtype=np.float32)), tmp)
    if vector.meta:
        write_text_atomic(path.with_suffix(".json"), json.dumps(vector.meta, indent=2) + "\n")
    return path


def load_vector(path: str | Path) -> PersonaVector:
    """Load a `.pt` persona vector (weights_only) and its sidecar if present."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"vector file {path} does not exist: check the path")
    try:
        t = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = f"{path} is not a readable torch tensor file ({type(e).__name__})"
        raise PertokenError(msg) from None
    _check_tensor(t, path)
    sidecar = path.with_suffix(".json")
    try:
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except json.JSONDecodeError:
        meta = {}  # a damaged sidecar must not make the vector itself unusable
    data = t.float().numpy()  # [n_layers + 1, hidden]
    check_finite(data, path)
    return PersonaVector(data, meta)


def _check_tensor(t, path: Path) -> None:
    import torch

    # at least the embedding row and one block's row, and a non-empty hidden size
    if not isinstance(t, torch.Tensor) or t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 1:
        shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise PertokenError(
            f"{path} holds {shape}, not a [n_layers+1, hidden] tensor: pass a persona vector "
            "written by `pertoken extract`"
        )
    if t.is_complex():
        raise PertokenError(f"{path} holds complex values: a persona vector is real (float32)")


def checked_data(data, where: str) -> np.ndarray:
    """`data` as float32 [n_layers + 1, hidden]: the checks load_vector makes of a file."""
    arr = np.asarray(data)
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise PertokenError(
            f"{where} data has shape {list(arr.shape)}, not [n_layers+1, hidden] with at least "
            "two rows: give one row per layer row (row 0 the embeddings), e.g. "
            "np.stack(rows), or load a file with load_vector"
        )
    if np.iscomplexobj(arr):
        raise PertokenError(f"{where} holds complex values: a persona vector is real (float32)")
    try:
        with np.errstate(over="ignore"):
            arr = arr.astype(np.float32, copy=False)
    except (TypeError, ValueError):
        raise PertokenError(f"{where} holds {arr.dtype} values, not numbers") from None
    check_finite(arr, where)
    return arr


def check_finite(data: np.ndarray, where: str | Path = "vector") -> None:
    """A clear error when a vector holds NaN or infinite values."""
    bad = ~np.isfinite(data)
    if bad.any():
        row = int(np.argwhere(bad)[0][0]) if data.ndim > 1 else None
        at = f" (first at row {row})" if row is not None else ""
        raise PertokenError(
            f"{where} holds {int(bad.sum())} NaN or infinite values{at}: the vector is "
            "damaged; extract it again"
        )


def check_coef(coef: float) -> float:
    """A steering coefficient as a float; a clear error when it is NaN or infinite."""
    coef = float(coef)
    if not math.isfinite(coef):
        raise PertokenError(
            f"steering coefficient {coef} is not a finite number: pass a number such as 2 or -1.5"
        )
    return coef
