"""The wheel ships every subpackage and the package data (the root maps to `pertoken`)."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_module_and_data_file(tmp_path):
    # build from a fresh copy: a stale build/ folder would hide a missing package
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("build", ".venv", "*.egg-info", "__pycache__", ".git")
    shutil.copytree(ROOT, src, ignore=skip)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("pertoken-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        "pertoken/" + str(p.relative_to(ROOT))
        for pattern in ("**/*.py", "traits/*.json", "pipeline/*.html")
        for p in ROOT.glob(pattern)
        if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", ".venv", "build")
    }
    assert wanted - names == set()
    assert not any(n.startswith("pertoken/tests/") for n in names)


def test_readme_test_command_installs_torch_as_ci_does():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(pip install torch.*python -m pytest -q)\n```", readme).group(1)
    torch_install = command.split(" && ")[0]
    assert torch_install == (
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    )
    ci = (ROOT / ".ci" / "run").read_text()
    assert "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu\n" in ci
    assert 'pip install -q torch==2.13.0 --index-url "$TORCH_CPU_INDEX"' in ci
    lines = ci.splitlines()
    assert lines.index("export PERTOKEN_REQUIRE_BROWSER=1") < lines.index("python -m pytest -q")


@pytest.mark.parametrize("reachable", [True, False])
def test_ci_installs_cpu_torch_or_falls_back_to_the_plain_pin(tmp_path, reachable):
    """The torch step of .ci/run, with `python` (the index probe) and `pip` stubbed."""
    ci = (ROOT / ".ci" / "run").read_text()
    step = re.search(r"^TORCH_CPU_INDEX=.*?^fi$", ci, re.M | re.S).group(0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"python": f"exit {0 if reachable else 1}", "pip": f'echo "$@" >> {tmp_path}/pip'}
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin"}
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", step], env=env, capture_output=True)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "pip").read_text().splitlines()
    cpu = "install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    assert calls == ([cpu] if reachable else ["install -q torch==2.13.0"])
