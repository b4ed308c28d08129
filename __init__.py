"""pertoken: persona vectors, steering and per-token trait monitoring for chat LLMs."""

__version__ = "0.1.0"

from pertoken.errors import PertokenError

__all__ = ["PertokenError", "__version__"]
