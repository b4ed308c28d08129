"""The architecture's import rules, read from the source: no cycle (in-function imports
included), no upward import, no file-name prefix families in pipeline/."""

from pathlib import Path

from tests.import_graph import ROOT, cycles, graph, prefix_families, unknown, upward


def test_the_package_has_no_import_cycle_and_no_upward_import():
    g = graph()
    assert "pertoken.pipeline.vet.stage" in g and "pertoken.backends.base" in g
    assert cycles(g) == []
    assert upward(g) == []
    assert unknown() == []


def test_pipeline_has_sub_packages_not_name_prefix_families():
    assert prefix_families(ROOT / "pipeline") == {}
    for sub in ("trace", "judge", "vet", "sweep"):
        assert (ROOT / "pipeline" / sub / "__init__.py").is_file()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_sees_in_function_cycles_and_upward_imports(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "pipeline/__init__.py": "",
        "pipeline/a.py": "def f():\n    from pertoken.pipeline import b\n",
        "pipeline/b.py": "from pertoken.pipeline.a import f\n",
        "backends/__init__.py": "",
        "backends/base.py": "from pertoken.pipeline.b import x\n",
        "backends/torch/__init__.py": "",
        "backends/torch/hooks.py": "",
        "pipeline/c.py": "import pertoken.backends.torch.hooks\n",
        "commands/__init__.py": "",
        "commands/env.py": "def f():\n    from pertoken.backends.torch import hooks\n",
    })  # fmt: skip
    g = graph(root)
    assert cycles(g) == [["pertoken.pipeline.a", "pertoken.pipeline.b"]]
    assert ("pertoken.backends.base", "pertoken.pipeline.b") in upward(g)
    assert ("pertoken.pipeline.c", "pertoken.backends.torch.hooks") in upward(g)
    assert ("pertoken.commands.env", "pertoken.backends.torch.hooks") in upward(g)
    assert unknown(root) == []
    (root / "pipeline" / "d.py").write_text("def f():\n    from pertoken.pipeline.gone import x\n")
    assert unknown(root) == [("pertoken.pipeline.d", "pertoken.pipeline.gone")]


def test_prefix_families_are_found(tmp_path):
    root = _tree(tmp_path, {"vet.py": "", "vet_report.py": "", "vet_stats.py": "", "run.py": ""})
    assert prefix_families(root) == {"vet": ["vet_report.py", "vet_stats.py", "vet.py"]}
