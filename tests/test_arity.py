"""No function in `pipeline/` takes more than seven parameters: options travel as the frozen
objects of pipeline/options.py (ModelChoice, Generation, JudgeSettings), not as long argument
lists, so a reader can follow a flag from the command line to the stage that reads it."""

from __future__ import annotations

import ast

from tests.import_graph import modules

LIMIT = 7


def arity(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Positional and keyword-only parameters, not counting self/cls, *args or **kwargs."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def wide_functions(limit: int = LIMIT) -> list[tuple[str, str, int]]:
    out = []
    for name, path in modules().items():
        if not name.startswith("pertoken.pipeline"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and arity(node) > limit:
                out.append((name, node.name, arity(node)))
    return out


def test_no_pipeline_function_takes_more_than_seven_parameters():
    assert wide_functions() == []


def test_the_count_sees_keyword_only_parameters_and_skips_self():
    fn = ast.parse("def f(self, a, b=1, *args, c, d=2, **kw): pass").body[0]
    assert arity(fn) == 4


if __name__ == "__main__":
    for limit in (LIMIT, 5):
        wide = wide_functions(limit)
        print(f"> {limit}: {len(wide)}")
        for row in sorted(wide, key=lambda r: -r[2]):
            print("  ", *row)
