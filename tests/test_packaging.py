"""The wheel ships every subpackage and the package data (the root maps to `pertoken`)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

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
        for pattern in ("**/*.py", "traits/*.json", "pipeline/*.html", "serve/static/*")
        for p in ROOT.glob(pattern)
        if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", ".venv", "build")
    }
    assert wanted - names == set()
    assert not any(n.startswith("pertoken/tests/") for n in names)
