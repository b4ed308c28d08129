"""The package's import graph, read from the source with `ast` (in-function and TYPE_CHECKING
imports included), and the two rules the architecture keeps: no cycle, no upward import.

    python -m tests.import_graph          # prints cycles and upward imports; exit 1 if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP = {"tests", "benchmarks", "test-artifacts", "build", "dist"}

# Each layer may import itself and the layers listed after it, never one listed before it.
LAYERS = ["cli", "commands", "serve", "api", "pipeline", "backends", "sae", "base"]
# The Python API's modules re-export the layers below them.
FACADE = {"pertoken": "api", "pertoken.api": "api", "pertoken.trace": "api"}
# Above backends/, models are reached through the registry and the Backend protocol only.
_ENGINES = ("pertoken.backends.torch", "pertoken.backends.mlx")
FORBIDDEN = {name: _ENGINES for name in ("cli", "commands", "serve", "api", "pipeline")}


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package by dotted name (`pertoken.pipeline.vet.stage`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in SKIP or rel.parts[0].startswith("."):
            continue
        parts = ["pertoken", *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            # `from pkg import mod` imports the module pkg.mod where there is one
            found |= {
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            }
    return {_owner(m, known) for m in found if m.split(".")[0] == "pertoken"} - {None, name}


def unknown(root: Path = ROOT) -> list[tuple[str, str]]:
    """(module, what it imports) for imports of package modules that do not exist, such as a
    module left behind by a move."""
    known, out = modules(root), []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                wanted = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, package)
                wanted = [] if base in known else [base]
            else:
                continue
            out += [(name, w) for w in wanted if w.split(".")[0] == "pertoken" and w not in known]
    return sorted(out)


def _child(base: str, name: str, known) -> str:
    return f"{base}.{name}" if f"{base}.{name}" in known else base


def _absolute(node: ast.ImportFrom, package: str) -> str:
    if not node.level:
        return node.module or ""
    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(parts + ([node.module] if node.module else []))


def _owner(dotted: str, known: dict[str, Path]) -> str | None:
    """The module that defines `dotted` (a module, or a name inside one)."""
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    known = modules(root)
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> str:
    if name in FACADE:
        return FACADE[name]
    top = name.split(".")[1] if "." in name else "base"
    return top if top in LAYERS else "base"


def upward(g: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports of a layer listed before the importer's own, and imports the layer forbids."""
    bad = []
    for name, deps in sorted(g.items()):
        rank = LAYERS.index(layer(name))
        for dep in sorted(deps):
            forbidden = FORBIDDEN.get(layer(name), ())
            if LAYERS.index(layer(dep)) < rank or dep.startswith(forbidden):
                bad.append((name, dep))
    return bad


def prefix_families(folder: Path, size: int = 3) -> dict[str, list[str]]:
    """File-name prefixes (before the first `_`) shared by `size` or more modules of a folder."""
    groups: dict[str, list[str]] = {}
    for path in sorted(folder.glob("*.py")):
        if "_" in path.stem.strip("_"):
            groups.setdefault(path.stem.split("_")[0], []).append(path.name)
    stems = {p.stem for p in folder.glob("*.py")}
    return {
        k: v + [f"{k}.py"] * (k in stems)
        for k, v in groups.items()
        if len(v) + (k in stems) >= size
    }


def main() -> int:
    g = graph()
    problems = [" -> ".join(c) for c in cycles(g)] + [f"{a} imports {b}" for a, b in upward(g)]
    problems += [f"{a} imports {b}, which does not exist" for a, b in unknown()]
    print("\n".join(problems) or f"{len(g)} modules: no cycle, no upward import")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
