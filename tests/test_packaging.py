"""The wheel ships every subpackage and the package data (the root maps to `pertoken`), and
brings MLX by default on Apple Silicon only."""

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
APPLE = {"sys_platform": "darwin", "platform_machine": "arm64"}
ELSEWHERE = [
    {"sys_platform": "linux", "platform_machine": "x86_64"},
    {"sys_platform": "linux", "platform_machine": "aarch64"},
    {"sys_platform": "darwin", "platform_machine": "x86_64"},
    {"sys_platform": "win32", "platform_machine": "AMD64"},
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # build from a fresh copy: a stale build/ folder would hide a missing package
    tmp_path = tmp_path_factory.mktemp("wheel")
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
    (path,) = tmp_path.glob("pertoken-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_holds_every_module_and_data_file(wheel):
    names = set(wheel.namelist())
    wanted = {
        "pertoken/" + str(p.relative_to(ROOT))
        for pattern in ("**/*.py", "traits/*.json", "pipeline/*.html", "serve/static/*")
        for p in ROOT.glob(pattern)
        if p.relative_to(ROOT).parts[0] not in ("tests", "benchmarks", ".venv", "build")
    }
    assert wanted - names == set()
    assert not any(n.startswith("pertoken/tests/") for n in names)


def requirements(wheel) -> list[Requirement]:
    """The wheel's Requires-Dist lines, parsed."""
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    lines = wheel.read(meta).decode().splitlines()
    return [
        Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")
    ]


def installed_by(wheel, env: dict, extra: str = "") -> set[tuple[str, tuple[str, ...]]]:
    """(name, extras) of what `pip install pertoken[extra]` brings on `env`."""
    env = {**env, "extra": extra}
    return {
        (r.name, tuple(sorted(r.extras)))
        for r in requirements(wheel)
        if r.marker is None or r.marker.evaluate(env)
    }


def test_mlx_is_a_default_dependency_on_apple_silicon_only(wheel):
    mac = {name for name, _ in installed_by(wheel, APPLE)}
    assert {"mlx", "mlx-lm", "torch", "transformers"} <= mac
    mlx = [r for r in requirements(wheel) if r.name in ("mlx", "mlx-lm") and "extra" not in str(r)]
    assert len(mlx) == 2 and all(r.marker.evaluate({**APPLE, "extra": ""}) for r in mlx)
    for env in ELSEWHERE:
        names = {name for name, _ in installed_by(wheel, env)}
        assert {"torch", "transformers"} <= names, env  # the CPU/CUDA install as before
        assert not {"mlx", "mlx-lm"} & names, env


def test_the_mlx_extra_still_installs_mlx_on_linux(wheel):
    linux = installed_by(wheel, ELSEWHERE[0], extra="mlx")
    assert ("mlx", ("cpu",)) in linux and ("mlx-lm", ()) in linux


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
    pytest_line = next(i for i, x in enumerate(lines) if x.startswith("python -m pytest -q"))
    assert lines.index("export PERTOKEN_REQUIRE_BROWSER=1") < pytest_line


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


def test_readme_installs_the_cpu_torch_before_the_main_job_on_linux():
    """Following the set-up in order on a CPU-only Linux box never installs the CUDA torch."""
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    cpu = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
    main_job = next(i for i, b in enumerate(blocks) if "pertoken run" in b)
    assert any(b.startswith(cpu) for b in blocks[:main_job])
    assert "Linux without a CUDA GPU" in setup.split(blocks[main_job])[0]
