"""Write persona vectors in the formats other tools read, and read them back.

- pt: the native `[n_layers + 1, hidden]` float32 tensor.
- safetensors: one `[hidden]` tensor per row, `layer.{L}`, plus metadata.
- gguf: a llama.cpp / repeng control vector. Row L is `direction.{L-1}` (the output of block
  L-1); llama.cpp rejects `direction.0`, so rows 0 and 1 cannot be written."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pertoken.atomic import atomic_path
from pertoken.backends.steer import Steer
from pertoken.errors import PertokenError
from pertoken.names import FORMATS as FORMATS  # the CLI's choices, numpy-free
from pertoken.rows import check_capture_rows
from pertoken.vectors import ROWS_FROM_FILE, PersonaVector, check_finite, load_vector, save_vector

GGUF_ARCH = "controlvector"
SAFETENSORS_FORMAT = "pertoken-persona-vector"
FIRST_GGUF_ROW = 2  # direction.1 = row 2; direction.0 (row 1) is rejected by llama.cpp
MAX_LAYERS = 1024  # more decoder blocks than any model has: bounds what a file can make us allocate


@dataclass
class ExportResult:
    path: Path
    format: str
    rows: list[int]
    left_out: list[int] = field(default_factory=list)  # rows the format cannot hold


def format_of(path: str | Path, fmt: str | None = None) -> str:
    """The export format: `fmt` when given, else from the file suffix."""
    fmt = fmt or Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise PertokenError(
            f"cannot tell the format of {path}: pass --format {'|'.join(FORMATS)} "
            "or an --out ending in .pt, .safetensors or .gguf"
        )
    return fmt


def export_vector(
    vector: str | Path | PersonaVector | Steer,
    *,
    out: str | Path,
    fmt: str | None = None,
    layers: list[int] | None = None,
    model_hint: str | None = None,
    n_layers: int | None = None,
) -> ExportResult:
    """Write `vector` to `out` as pt, safetensors or gguf (default: from the suffix).

    layers: rows to write (default all; for gguf 2..n_layers, since rows 0-1 cannot be held).
    model_hint: the GGUF `controlvector.model_hint` (default: the model's config model_type).
    A Steer (with the model's n_layers) is written as the control vector it adds."""
    if isinstance(vector, Steer):
        vector = control_vector(vector, n_layers)
    vec = vector if isinstance(vector, PersonaVector) else load_vector(vector)
    fmt, out = format_of(out, fmt), Path(out)
    rows, left_out = _rows(vec, fmt, layers)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "pt":
        write_pt(vec, rows, out)
    elif fmt == "safetensors":
        write_safetensors(vec, rows, out)
    else:
        write_gguf(vec, rows, out, model_hint=model_hint or hint_of(vec.meta))
    return ExportResult(out, fmt, rows, left_out)


def control_vector(steer: Steer, n_layers: int | None) -> PersonaVector:
    """A Steer of add terms as one control vector, coef * v summed per row (what llama.cpp's
    --control-vector and repeng add). Other operators have no control-vector form."""
    for t in steer.terms:
        if t.op != "add" or t.when is not None:
            what = f"{t.op} with a condition" if t.when is not None else t.op
            raise PertokenError(
                f"a GGUF or repeng control vector can only add, so the {what} at layer {t.row} "
                "cannot be exported: export the vector itself and apply the operator with "
                "pertoken (steer, serve or the Python API)"
            )
    if n_layers is None:
        raise PertokenError("exporting a Steer needs the model's n_layers")
    hidden = len(steer.terms[0].vector) if steer.terms else 0
    data = np.zeros((n_layers + 1, hidden), np.float32)
    for row, v in steer.by_row().items():
        data[row] = v
    return PersonaVector(data, {})


def import_vector(
    path: str | Path, *, out: str | Path | None = None, n_layers: int | None = None
) -> PersonaVector:
    """Read a GGUF control vector (or a pertoken .safetensors / .pt) into a persona vector.

    Missing rows are zero; n_layers comes from the file unless given. Saved to `out` if set."""
    path = Path(path)
    if not path.is_file():
        raise PertokenError(f"{path} does not exist: check the path")
    fmt = format_of(path)
    if fmt == "gguf":
        vec = read_gguf(path, n_layers=n_layers)
    elif fmt == "safetensors":
        vec = read_safetensors(path, n_layers=n_layers)
    else:
        vec = load_vector(path)
    if out is not None:
        save_vector(vec, out)
    return vec


def _rows(vec: PersonaVector, fmt: str, layers: list[int] | None) -> tuple[list[int], list[int]]:
    if layers is None:
        first = FIRST_GGUF_ROW if fmt == "gguf" else 0
        return list(range(first, vec.n_layers + 1)), list(range(first))
    rows = sorted(set(layers))
    check_capture_rows(rows, vec.n_layers)
    bad = [r for r in rows if r < FIRST_GGUF_ROW]
    if fmt == "gguf" and bad:
        raise PertokenError(
            f"rows {bad} cannot go into a GGUF control vector: row L is llama.cpp's "
            "direction.{L-1} and llama.cpp rejects direction.0 (row 0 is the embedding); "
            f"export rows {FIRST_GGUF_ROW}..{vec.n_layers}"
        )
    return rows, []


def hint_of(meta: dict) -> str:
    """GGUF `controlvector.model_hint`: the config's model_type (`llama`, `gemma2`), as repeng
    writes it; the model's name only when no config is known."""
    hint = meta.get("model_type") or meta.get("model_hint")
    model = str(meta.get("model") or "")
    if not hint and model:
        hint = _config_model_type(model) or Path(model.rstrip("/\\")).name
    return str(hint or "unknown")


def _config_model_type(model: str) -> str | None:
    """model_type from a local folder's config.json or one in the hub cache (no network)."""
    config = Path(model).expanduser() / "config.json"
    if not config.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # not a repo id, or no cache
            return None
        if not isinstance(cached, str):
            return None
        config = Path(cached)
    try:
        return json.loads(config.read_text()).get("model_type") or None
    except (OSError, ValueError, AttributeError):
        return None


# ---------------------------------------------------------------- pt
def write_pt(vec: PersonaVector, rows: list[int], path: Path) -> None:
    data = np.zeros_like(vec.data)  # [n_layers + 1, hidden]; rows left out stay zero
    data[rows] = vec.data[rows]
    meta = dict(vec.meta)
    if len(rows) < vec.n_layers + 1:
        meta["rows"] = rows
    save_vector(PersonaVector(data, meta), path)


# ---------------------------------------------------------------- safetensors
def write_safetensors(vec: PersonaVector, rows: list[int], path: Path) -> None:
    from safetensors.numpy import save_file

    tensors = {f"layer.{r}": np.ascontiguousarray(vec.data[r], dtype=np.float32) for r in rows}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "n_layers": str(vec.n_layers),
        "hidden_size": str(vec.hidden_size),
        "layers": ",".join(map(str, rows)),
        "convention": "layer.L is HF output_hidden_states[L], the output of decoder block L-1",
        "meta": json.dumps(vec.meta),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def read_safetensors(path: Path, *, n_layers: int | None = None) -> PersonaVector:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            rows = {_row_of(k, path): f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise PertokenError(f"{path} is not a readable .safetensors file ({e})") from None
    if metadata.get("format") != SAFETENSORS_FORMAT:
        raise PertokenError(f"{path} was not written by `pertoken export`: no pertoken metadata")
    try:
        n_layers = n_layers or int(metadata.get("n_layers", max(rows, default=0)))
    except ValueError:
        raise PertokenError(f"{path} has a damaged n_layers entry: pass --n-layers") from None
    try:
        meta = json.loads(metadata.get("meta") or "{}")
    except json.JSONDecodeError:
        meta = {}
    return PersonaVector(_assemble(rows, n_layers, path), meta)


def _row_of(name: str, path: Path) -> int:
    m = re.fullmatch(r"layer\.(\d+)", name)
    if not m:
        raise PertokenError(f"{path} holds tensor {name!r}; pertoken files hold layer.L tensors")
    return int(m.group(1))


# ---------------------------------------------------------------- gguf
def write_gguf(vec: PersonaVector, rows: list[int], path: Path, *, model_hint: str) -> None:
    """A control vector as llama.cpp's `--control-vector` and repeng read it: architecture
    "controlvector", model_hint, layer_count, and 1-D F32 tensors `direction.{L-1}`."""
    import gguf

    with atomic_path(path) as tmp:
        _write_gguf(gguf.GGUFWriter(str(tmp), GGUF_ARCH), vec, rows, model_hint)


def _write_gguf(writer, vec: PersonaVector, rows: list[int], model_hint: str) -> None:
    writer.add_string(f"{GGUF_ARCH}.model_hint", model_hint)
    # direction slots 1..n_layers-1, as repeng and llama.cpp's cvector-generator count them
    writer.add_uint32(f"{GGUF_ARCH}.layer_count", vec.n_layers - 1)
    for r in rows:
        writer.add_tensor(f"direction.{r - 1}", np.ascontiguousarray(vec.data[r], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: Path, *, n_layers: int | None = None) -> PersonaVector:
    """Rows from `direction.N` tensors (row N+1); n_layers from layer_count + 1 unless given.

    repeng writes layer_count = the number of directions, which undercounts a file holding some
    layers; such a vector is marked so it is padded with zero rows when used with a model."""
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise PertokenError(f"{path} is not a readable GGUF file ({e})") from None
    arch = _field(reader, "general.architecture")
    if arch is not None and arch != GGUF_ARCH:
        raise PertokenError(
            f"{path} is a GGUF {arch!r} file, not a control vector: pass a file written by "
            "`pertoken export --format gguf`, repeng or llama.cpp's cvector-generator"
        )
    rows: dict[int, np.ndarray] = {}
    for t in reader.tensors:
        n = _direction_index(t, path, n_layers or MAX_LAYERS)
        data = np.asarray(t.data, dtype=np.float32).reshape(-1)
        rows[n + 1] = rows[n + 1] + data if n + 1 in rows else data.copy()
    meta = {"imported_from": str(path)}
    if hint := _field(reader, f"{GGUF_ARCH}.model_hint"):
        meta["model_hint"] = hint
    if n_layers is None:
        n_layers = _file_n_layers(_field(reader, f"{GGUF_ARCH}.layer_count"), rows, path)
        meta[ROWS_FROM_FILE] = True
    return PersonaVector(_assemble(rows, n_layers, path), meta)


def _file_n_layers(count, rows: dict[int, np.ndarray], path: Path) -> int:
    """n_layers from layer_count + 1 (llama.cpp, pertoken) or the highest row (repeng)."""
    if count is not None and not 0 <= int(count) < MAX_LAYERS:
        raise PertokenError(
            f"{path} says controlvector.layer_count = {count}, more than any model has: "
            "pass --n-layers with the model's number of decoder blocks"
        )
    return max(int(count) + 1 if count is not None else 0, max(rows, default=0))


def _direction_index(t, path: Path, n_layers: int) -> int:
    """N of a `direction.N` tensor; rows above n_layers are refused before any is allocated."""
    import gguf

    m = re.fullmatch(r"direction\.(\d+)", t.name)
    if not m or int(m.group(1)) == 0:
        raise PertokenError(
            f"{path} holds tensor {t.name!r}: a control vector holds only direction.N, N >= 1"
        )
    if int(m.group(1)) + 1 > n_layers:
        raise PertokenError(
            f"{path} holds {t.name} (row {int(m.group(1)) + 1}) but n_layers is at most "
            f"{n_layers}: pass --n-layers with the model's number of decoder blocks"
        )
    if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
        raise PertokenError(
            f"{path}: {t.name} is {t.tensor_type.name} of shape {list(t.shape)}; "
            "llama.cpp control vectors hold 1-D F32 tensors"
        )
    return int(m.group(1))


def _field(reader, key: str):
    f = reader.get_field(key)
    if f is None:
        return None
    if hasattr(f, "contents"):
        return f.contents()
    value = f.parts[f.data[0]]  # gguf < 0.11 has no contents()
    return bytes(value).decode() if f.types[0].name == "STRING" else value.tolist()[0]


def _assemble(rows: dict[int, np.ndarray], n_layers: int, path: Path) -> np.ndarray:
    if not rows:
        raise PertokenError(f"{path} holds no direction tensors")
    if not 1 <= n_layers <= MAX_LAYERS:
        raise PertokenError(
            f"{path}: n_layers {n_layers} is outside 1..{MAX_LAYERS}: pass --n-layers with the "
            "model's number of decoder blocks"
        )
    widths = {len(v) for v in rows.values()}
    if len(widths) != 1:
        raise PertokenError(f"{path} mixes direction widths {sorted(widths)}")
    if max(rows) > n_layers:
        raise PertokenError(
            f"{path} holds row {max(rows)} but n_layers is {n_layers}: pass --n-layers "
            "with the model's number of decoder blocks"
        )
    if any(np.iscomplexobj(v) for v in rows.values()):
        raise PertokenError(f"{path} holds complex values: a persona vector is real (float32)")
    data = np.zeros((n_layers + 1, widths.pop()), dtype=np.float32)  # [n_layers + 1, hidden]
    for r, v in rows.items():
        data[r] = v
    check_finite(data, path)
    return data
