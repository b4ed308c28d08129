"""Backend registry: pick `torch`, `mlx` or `auto` by name; heavy imports happen on demand."""

from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pertoken.backends import machine as probe
from pertoken.errors import PertokenError, PertokenWarning
from pertoken.names import BACKENDS

if TYPE_CHECKING:
    from pertoken.backends.base import Backend


@dataclass(frozen=True)
class _Entry:
    module: str
    cls: str
    needs: tuple[str, ...]  # importable packages
    install: str  # the pip requirement that brings them
    default_model: str  # what `run` uses without --model


_REGISTRY = {
    "torch": _Entry(
        "pertoken.backends.torch", "TorchBackend", ("torch", "transformers"), "pertoken",
        "google/gemma-2-9b-it",
    ),
    "mlx": _Entry(
        "pertoken.backends.mlx", "MLXBackend", ("mlx", "mlx_lm"), "pertoken[mlx]",
        "mlx-community/gemma-2-9b-it-4bit",
    ),
}  # fmt: skip
_warned: set[str] = set()  # warnings already shown in this process

__all__ = ["BACKENDS", "Backend", "Steer", "SteerTerm", "Summaries", "TokenTrace"]
_BASE = ("Backend", "Steer", "SteerTerm", "Summaries", "TokenTrace")


def __getattr__(name: str):
    # base.py imports numpy; the registry alone must not, so `pertoken --help` stays light
    if name in _BASE:
        from pertoken.backends import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class Choice:
    backend: str
    reason: str  # why, in a few words
    warning: str | None = None


def is_installed(name: str) -> bool:
    return all(importlib.util.find_spec(p) is not None for p in _REGISTRY[name].needs)


def choose(name: str = "auto") -> Choice:
    """The backend `name` stands for and why: auto = mlx on Apple Silicon when installed."""
    if name != "auto":
        return Choice(_installed(name), "asked for with --backend")
    here = probe.this_machine()
    if not here.apple_silicon:
        return Choice("torch", f"{here} is not an Apple Silicon Mac")
    if is_installed("mlx"):
        return Choice("mlx", "Apple Silicon with MLX installed")
    install = _REGISTRY["mlx"].install
    warning = (
        "MLX is not installed, so --backend auto uses torch, which is slow on Apple Silicon "
        f'(on cpu, or on the fragile mps device): pip install "{install}"'
    )
    return Choice("torch", "Apple Silicon without MLX", warning)


def _installed(name: str) -> str:
    if name not in _REGISTRY:
        raise PertokenError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if not is_installed(name):
        entry = _REGISTRY[name]
        raise PertokenError(
            f'the {name} backend is not installed: pip install "{entry.install}" (needs '
            f"{' and '.join(entry.needs)})"
        )
    return name


def resolve(name: str = "auto") -> str:
    """`auto` = mlx on Apple Silicon when installed, else torch (with a warning, once, on a
    Mac without MLX)."""
    choice = choose(name)
    if choice.warning and choice.warning not in _warned:
        _warned.add(choice.warning)
        warnings.warn(choice.warning, PertokenWarning, stacklevel=2)
    return choice.backend


def default_model(backend: str = "auto") -> str:
    """The model `run` uses without --model: Gemma 2 9B-it, 4-bit on MLX, bf16 on torch."""
    name = backend if backend in _REGISTRY else resolve(backend)
    return _REGISTRY[name].default_model


def describe_choice(backend: str = "auto", model: str | None = None) -> str:
    """One line on which backend and model a command uses and why (model None: the default)."""
    choice = choose(backend)
    if model is None:
        used = f"model {default_model(choice.backend)} (the {choice.backend} default)"
    else:
        used = f"model {model} (--model)"
    why = f"--backend auto: {choice.reason}" if backend == "auto" else choice.reason
    return f"backend {choice.backend} ({why}); {used}"


def check_memory(model: str, backend: str = "auto", *, dtype: str | None = None, **options):
    """On MLX, a PertokenError naming a variant that fits when `model` will not; returns the
    memory.Fit (None on torch, whose devices manage their own memory)."""
    if resolve(backend) != "mlx":
        return None
    from pertoken.backends.memory import require_fit

    return require_fit(model, dtype=dtype, **options)


def backend_class(name: str = "auto") -> type[Backend]:
    entry = _REGISTRY[resolve(name)]
    return getattr(importlib.import_module(entry.module), entry.cls)


def default_settings(name: str) -> dict:
    """{"device", "dtype"} that backend `name` picks without --device and --dtype; only its
    light `load` module is imported."""
    entry = _REGISTRY[resolve(name)]
    return importlib.import_module(f"{entry.module}.load").default_settings()


def choose_settings(
    model: str, backend: str = "auto", *, dtype: str | None = None, device: str | None = None
) -> tuple[str, str, str]:
    """(backend, device, dtype) that `load_backend` will use, without loading the model."""
    cls = backend_class(backend)
    return (cls.name, *cls.choose(model, dtype=dtype, device=device))


def load_backend(
    model: str,
    backend: str = "auto",
    *,
    dtype: str | None = None,
    device: str | None = None,
    compile: bool = False,
) -> Backend:
    """Load `model` (hub id or local folder) with the named backend, after checking that it
    fits in memory (MLX). compile: the torch backend's compiled decode step."""
    check_memory(model, backend, dtype=dtype)
    cls = backend_class(backend)
    if not compile:
        return cls.load(model, dtype=dtype, device=device)
    if cls.name != "torch":
        raise PertokenError(
            f"--compile is for the torch backend (CUDA graphs); {cls.name} does not use it: "
            "drop --compile"
        )
    return cls.load(model, dtype=dtype, device=device, compile=True)
