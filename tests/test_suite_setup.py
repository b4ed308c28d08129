"""How the suite runs: the default run leaves slow tests out and `.ci/run` selects them; the
semantic model says what it does while it trains, and is reused from its cache."""

import io
import shlex
import subprocess
import sys
from pathlib import Path

from tests import semantic_model as sm

ROOT = Path(__file__).resolve().parents[1]
TINY = {**sm.RECIPE, "hidden": 16, "intermediate": 32, "heads": 2, "kv_heads": 1,
        "examples": 24, "steps": 2, "batch": 4}  # fmt: skip


def _collect(*args: str) -> str:
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    cmd += [*args, "tests/test_semantic_vet.py", "tests/test_generate.py"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300).stdout


def test_the_default_run_leaves_slow_tests_out_and_ci_runs_them():
    default = _collect()
    assert "test_semantic_vet.py" not in default and "deselected" in default
    (line,) = [x for x in (ROOT / ".ci" / "run").read_text().splitlines()
               if x.startswith("python -m pytest")]  # fmt: skip
    ci = _collect(*[a for a in shlex.split(line)[3:] if a != "-q"])
    assert "test_semantic_vet.py" in ci and "test_sigkill_mid_run_then_rerun" in ci
    assert "deselected" not in ci


def test_training_says_what_it_does_past_the_capture(tmp_path, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "__stderr__", err)
    monkeypatch.setenv("PERTOKEN_TEST_CACHE", str(tmp_path / "cache"))
    calls = []
    real = sm.build_semantic_model
    monkeypatch.setattr(sm, "build_semantic_model", lambda f: calls.append(f) or real(f, TINY))
    folder = sm.semantic_model_dir()
    text = err.getvalue()
    assert f"not cached in {tmp_path / 'cache'}" in text and "PERTOKEN_TEST_CACHE" in text
    assert "semantic test model: training 2 steps" in text and "step 2/2, loss" in text
    assert folder.parent == tmp_path / "cache" and (folder / "model.safetensors").is_file()
    assert sm.semantic_model_dir() == folder and len(calls) == 1  # the second use: the cache
