"""The Python API for notebooks: `pertoken.load` and the names `import pertoken` exposes.

Each name is imported on first use, so `import pertoken` loads neither torch, mlx nor
transformers."""

from __future__ import annotations

import importlib

# name -> the module that defines it
EXPORTS = {
    "PersonaVector": "pertoken.vectors",
    "load_vector": "pertoken.vectors",
    "save_vector": "pertoken.vectors",
    "Steer": "pertoken.backends.base",
    "Condition": "pertoken.backends.base",
    "extract_vectors": "pertoken.pipeline.extract",
    "monitor": "pertoken.pipeline.monitor",
    "Monitoring": "pertoken.pipeline.monitor",
    "evaluate": "pertoken.pipeline.sweep.grid",
    "run_pipeline": "pertoken.pipeline.run",
    # the option objects every stage takes (pipeline/options.py)
    "ModelChoice": "pertoken.pipeline.options",
    "Generation": "pertoken.pipeline.options",
    "JudgeSettings": "pertoken.pipeline.options",
    "Extraction": "pertoken.pipeline.options",
}


# submodules `import pertoken` reaches without importing them first (`pertoken.trace.load`)
SUBMODULES = ("trace",)


def export(name: str):
    """The object behind `pertoken.<name>`, imported now."""
    if name in SUBMODULES:
        return importlib.import_module(f"pertoken.{name}")
    if name not in EXPORTS:
        raise AttributeError(f"module 'pertoken' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)


def load(model: str, backend: str = "auto", dtype: str | None = None, device: str | None = None):
    """Load `model` (a Hugging Face id or a local folder) and return its Backend.

    backend: `auto` (MLX on Apple Silicon when installed, else torch), `torch` or `mlx`;
    dtype and device: None picks them as the CLI does (float32 on a CPU)."""
    from pertoken.pipeline.options import ModelChoice

    return ModelChoice(model, backend, dtype, device).load()
