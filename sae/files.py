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
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
    except (OSError, struct.error, ValueError, AttributeError) as e:
        raise PertokenError(f"{path} is not a readable .safetensors file ({e})") from None
    out = {}
    for name, t in header.items():
        dtype, shape, (begin, end) = _entry(path, name, t, size - 8 - n)
        if end == begin:
            out[name] = np.zeros(shape, np.float32)
            continue
        raw = np.memmap(path, _ST_DTYPES[dtype], "r", offset=8 + n + begin, shape=shape)
        out[name] = _bf16(raw) if dtype == "BF16" else _float32(raw)
    return out


def _entry(path: Path, name: str, t, data_size: int) -> tuple[str, tuple, tuple[int, int]]:
    """dtype, shape and byte span of one header entry, checked against the file's size."""
    keys = ("dtype", "shape", "data_offsets")
    missing = [k for k in keys if k not in t] if isinstance(t, dict) else list(keys)
    try:
        if missing:
            raise ValueError
        dtype, shape = t["dtype"], tuple(int(x) for x in t["shape"])
        begin, end = (int(x) for x in t["data_offsets"])
    except (TypeError, ValueError):
        lacks = f"lacks {', '.join(missing)}" if missing else "is malformed"
        raise PertokenError(
            f"{path}: the header entry of tensor {name} {lacks}: the file is damaged or not "
            "a safetensors file; download it again"
        ) from None
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise PertokenError(f"{path}: tensor {name} has dtype {dtype}, not a float")
    want = int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if not (0 <= begin <= end <= data_size and end - begin == want):
        raise PertokenError(
            f"{path}: tensor {name} needs bytes {begin}..{begin + want} but the file holds "
            f"{data_size}: it is truncated or damaged; download it again"
        )
    return dtype, shape, (begin, end)


def _bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _float32(a: np.ndarray) -> np.ndarray:
    return a if a.dtype == np.float32 else a.astype(np.float32)
