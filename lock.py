"""Advisory output locks: one pertoken process at a time writes an output file or folder.

`output_lock(path)` holds fcntl.flock on a lock file that records the owner's pid:
`.{name}.lock` beside a file, `.lock` inside a folder. A second process gets one clear line
instead of corrupting or duplicating the first one's work. The kernel drops the lock when its
owner dies (even by SIGKILL), so a lock file left behind never blocks a rerun.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

from pertoken.errors import PertokenError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, writes are still atomic
    fcntl = None

_held: dict[tuple[str, int], int] = {}  # (lock file, thread) -> depth: re-entry is allowed


def lock_file(path: str | Path, *, folder: bool = False) -> Path:
    path = Path(path)
    return path / ".lock" if folder else path.with_name(f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | Path, *, folder: bool = False):
    """Hold the lock on the output `path` (a file, or a folder with folder=True) in this block.

    The same thread may take a lock it already holds; another process gets a PertokenError
    naming the pid that holds it."""
    lock = lock_file(path, folder=folder)
    key = (os.path.abspath(lock), threading.get_ident())
    if fcntl is None or key in _held:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(lock, path)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)  # while still held, so no one locks a file about to vanish
        os.close(fd)


def _acquire(lock: Path, target) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            who = f"pid {pid}" if pid.isdigit() else "another process"
            raise PertokenError(
                f"{target} is in use by {who} (another pertoken process); wait for it or use "
                "another output"
            ) from None
        if _same_file(fd, lock):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)  # its owner removed it as we opened it: lock the new one


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
