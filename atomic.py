"""The one way pertoken writes a file: a uniquely named temporary file beside the target,
fsynced, then renamed over it.

A reader never sees half a file, a failed or killed write leaves the old file as it was, and two
writers never share (and delete) one temporary file. `atomic_path` serves writers that want a
path (torch.save, savefig, pyarrow, safetensors, gguf); the others build on it. `atomic_folder`
does the same for a folder of files (a training checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an error the file
    written there is fsynced and renamed to `path`, else it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # unique per process and call; ends in .tmp so no glob for the real suffix picks it up
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_writer(path: str | Path, **open_kw):
    """Yield a text file that replaces `path` when the block ends without an error."""
    with atomic_path(path) as tmp:
        # mode "x" keeps the umask's permissions (mkstemp's are 0600)
        with open(tmp, "x", encoding="utf-8", **open_kw) as f:
            yield f


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) in one rename."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Replace `path` with `data` in one rename."""
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data)
    return Path(path)


def save_figure_atomic(fig, path: str | Path, **savefig_kw) -> Path:
    """fig.savefig into `path` in one rename; the format comes from the suffix of `path`."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig_kw)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path`; when the block ends without an error it
    takes the place of `path` (the old folder goes), else it is removed. For a folder that one
    process writes at a time (under its output lock): the next writer clears what a killed one
    left, so a large folder is never left behind twice."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)  # a folder cannot be renamed over a non-empty one
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    """Flush the file's data to disk before the rename makes it visible."""
    fd = os.open(path, os.O_RDWR)  # Windows fsyncs only a writable handle
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (not possible on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
