"""pertoken: persona vectors, steering and per-token trait monitoring for chat LLMs.

From Python: `backend = pertoken.load(model)`, then `PersonaVector`, `load_vector`, `Steer`,
`extract_vectors`, `monitor`, `evaluate`, `run_pipeline` and the option objects `ModelChoice`,
`Generation`, `JudgeSettings`, `Extraction` (imported on first use); `pertoken.trace.load` reads
trace stores.
"""

from pertoken import api as _api
from pertoken.api import load
from pertoken.errors import PertokenError
from pertoken.version import __version__

__all__ = ["PertokenError", "__version__", "load", *_api.EXPORTS]


def __getattr__(name: str):
    return _api.export(name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_api.EXPORTS})
