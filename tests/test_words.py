"""One meaning per word: a "row" is a residual site (docs/CONVENTIONS.md "Layer rows"), an
entry of a batch is a "slot". The batch-entry names that said "row" must not come back."""

import ast
import re
from pathlib import Path

from tests.import_graph import ROOT

BATCH_ROW = re.compile(r"row_uniform|per_row\b|rows_of_batch|RowSampler|RowSteers|max_rows")


def identifiers(tree: ast.AST) -> set[str]:
    """Every name a module defines, reads, passes as a keyword or imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, ast.keyword) and node.arg:
            names.add(node.arg)
        elif isinstance(node, ast.alias):
            names.update(n for n in (node.name, node.asname) if n)
    return names


def batch_rows(root: Path = ROOT) -> dict[str, set[str]]:
    """File (relative to root) -> the batch-entry "row" names in it, for backends/ and serve/."""
    found = {}
    for sub in ("backends", "serve"):
        for path in sorted((root / sub).rglob("*.py")):
            names = identifiers(ast.parse(path.read_text(encoding="utf-8")))
            hits = {n for n in names if BATCH_ROW.search(n)}
            if hits:
                found[path.relative_to(root).as_posix()] = hits
    return found


def test_no_batch_entry_is_called_a_row():
    assert batch_rows() == {}


def test_the_check_sees_batch_row_names_and_leaves_residual_rows(tmp_path):
    (tmp_path / "backends").mkdir()
    (tmp_path / "serve").mkdir()
    (tmp_path / "backends" / "x.py").write_text(
        "from a import RowOps, steer_rows\n\n"
        "def f(per_row, rows, by_row):\n    return row_uniforms(per_row, on_row=rows)\n"
    )
    (tmp_path / "serve" / "y.py").write_text("from a import RowSampler as S\nS(max_rows=2)\n")
    assert batch_rows(tmp_path) == {
        "backends/x.py": {"per_row", "row_uniforms"},
        "serve/y.py": {"RowSampler", "max_rows"},
    }
