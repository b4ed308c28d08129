"""Names that become paths: one safe path component each, and files kept inside their folder."""

from __future__ import annotations

import os
from pathlib import Path

from pertoken.errors import PertokenError

_SEPARATORS = ("/", "\\", "\0")


def path_name(name: str, what: str = "name") -> str:
    """`name` when it can be one file or folder name; else a clear error naming `what`.

    Refused: empty, `.` or `..`, or anything holding a path separator (so not absolute either).
    """
    text = str(name)
    bad = (
        not text.strip()
        or text in (".", "..")
        or any(s in text for s in _SEPARATORS)
        or Path(text).is_absolute()
    )
    if bad:
        raise PertokenError(
            f"{what} {text!r} cannot name a file or folder: use one plain name without "
            "'/', '\\' or '..'"
        )
    return text


def model_basename(model: str) -> str:
    """The folder name a model's outputs go under: `org/name` -> `name`, `runs/m/..` -> `runs`.

    `..` and `.` are resolved against the working folder; a path with no name left (`/`)
    becomes `model`.
    """
    text = str(model).rstrip("/\\") or str(model) or "."
    name = Path(os.path.normpath(text)).name
    if name in ("", ".", ".."):
        name = Path(os.path.abspath(os.path.expanduser(text))).name
    return name if name not in ("", ".", "..") else "model"


def inside(folder: str | Path, *names: str) -> Path:
    """`folder/names...`, each name checked by path_name; refused if it leaves `folder`.

    The check is on the names, not on symlinks the user made inside the folder."""
    folder = Path(folder)
    path = folder.joinpath(*(path_name(n) for n in names))
    root, full = os.path.abspath(folder), os.path.abspath(path)
    if os.path.commonpath([root, full]) != root:
        raise PertokenError(f"{path} is outside {folder}: choose another name")
    return path
