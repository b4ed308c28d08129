"""Backend registry: pick `torch`, `mlx` or `auto` by name; heavy imports happen on demand."""

from __future__ import annotations

import importlib
import importlib.util
import platform

from pertoken.backends.base import Backend, Steer, SteerTerm, Summaries, TokenTrace
from pertoken.errors import PertokenError

# name -> (module, class, the packages it needs, how to install them)
_REGISTRY = {
    "torch": ("pertoken.backends.torch", "TorchBackend", ("torch", "transformers"), "pertoken"),
    "mlx": ("pertoken.backends.mlx", "MLXBackend", ("mlx", "mlx_lm"), "pertoken[mlx]"),
}
BACKENDS = ("auto", *_REGISTRY)

__all__ = ["BACKENDS", "Backend", "Steer", "SteerTerm", "Summaries", "TokenTrace"]


def is_installed(name: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in _REGISTRY[name][2])


def resolve(name: str = "auto") -> str:
    """`auto` = mlx on Apple Silicon when installed, else torch."""
    if name == "auto":
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        return "mlx" if apple and is_installed("mlx") else "torch"
    if name not in _REGISTRY:
        raise PertokenError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if not is_installed(name):
        extra = _REGISTRY[name][3]
        raise PertokenError(
            f'the {name} backend is not installed: pip install "{extra}" (needs '
            f"{' and '.join(_REGISTRY[name][2])})"
        )
    return name


def backend_class(name: str = "auto") -> type[Backend]:
    module, cls, _, _ = _REGISTRY[resolve(name)]
    return getattr(importlib.import_module(module), cls)


def choose_settings(
    model: str, backend: str = "auto", *, dtype: str | None = None, device: str | None = None
) -> tuple[str, str, str]:
    """(backend, device, dtype) that `load_backend` will use, without loading the model."""
    cls = backend_class(backend)
    return (cls.name, *cls.choose(model, dtype=dtype, device=device))


def load_backend(
    model: str, backend: str = "auto", *, dtype: str | None = None, device: str | None = None
) -> Backend:
    """Load `model` (hub id or local folder) with the named backend."""
    return backend_class(backend).load(model, dtype=dtype, device=device)
