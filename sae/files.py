"""Read SAE weight files as float32 arrays without copying: members of an uncompressed `.npz`
and float32 tensors of a `.safetensors` file come back as read-only memory maps."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import numpy.lib.format as fmt

from pertoken.errors import PertokenError

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Arrays of an `.npz`, memory-mapped where stored uncompressed, float32."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            infos = [i for i in zf.infolist() if i.filename.endswith(".npy")]
            out = {i.filename[:-4]: _npz_member(path, f, zf, i) for i in infos}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise PertokenError(f"{path} is not a readable .npz file ({e})") from None
    return {k: _float32(v) for k, v in out.items()}


def _npz_member(path: Path, f, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    if info.compress_type != zipfile.ZIP_STORED:
        with zf.open(info) as member:
            return fmt.read_array(member)
    # local file header: 30 fixed bytes, then the name and extra field, then the .npy bytes
    f.seek(info.header_offset)
    head = f.read(30)
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    start = info.header_offset + 30 + name_len + extra_len
    f.seek(start)
    version = fmt.read_magic(f)
    read_header = {(1, 0): fmt.read_array_header_1_0}.get(version, fmt.read_array_header_2_0)
    shape, fortran, dtype = read_header(f)
    if dtype.hasobject:
        raise ValueError(f"{info.filename} holds Python objects")
    order = "F" if fortran else "C"
    return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a `.safetensors` file, memory-mapped when float32, else converted to float32."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise PertokenError(f"{path} is not a readable .safetensors file ({e})") from None
    header.pop("__metadata__", None)
    out = {}
    for name, t in header.items():
        if t["dtype"] not in _ST_DTYPES:
            raise PertokenError(f"{path}: tensor {name} has dtype {t['dtype']}, not a float")
        begin, end = t["data_offsets"]
        shape = tuple(t["shape"])
        if end == begin:
            out[name] = np.zeros(shape, np.float32)
            continue
        raw = np.memmap(path, _ST_DTYPES[t["dtype"]], "r", offset=8 + n + begin, shape=shape)
        out[name] = _bf16(raw) if t["dtype"] == "BF16" else _float32(raw)
    return out


def _bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _float32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else a.astype(np.float32)
