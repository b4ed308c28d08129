"""Trace stores from Python: `pertoken.trace.load(DIR)` returns (tokens, items) as pandas
DataFrames (see docs/CONVENTIONS.md "Trace stores"); importing this loads neither torch nor mlx."""

from pertoken.pipeline.trace.store import load, read_settings

__all__ = ["load", "read_settings"]
