"""What this machine is and how much memory it has: stdlib probes, each small enough to fake.

Nothing here imports torch; mlx is imported only to ask Metal how much memory it may use.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import re
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass

# macOS lets the GPU wire about this share of unified memory when Metal cannot say
GPU_SHARE = 0.7


@dataclass(frozen=True)
class Machine:
    system: str  # platform.system(): Darwin, Linux, Windows
    arch: str  # platform.machine(): arm64, x86_64, aarch64

    @property
    def apple_silicon(self) -> bool:
        return self.system == "Darwin" and self.arch == "arm64"

    def __str__(self) -> str:
        return f"{'macOS' if self.system == 'Darwin' else self.system} {self.arch}"


def this_machine() -> Machine:
    return Machine(platform.system(), platform.machine())


def may_have_cuda() -> bool:
    """Whether torch could see a CUDA device here: never on macOS; on Linux only with NVIDIA's
    driver loaded; elsewhere, maybe (ask torch). Lets reports skip importing torch."""
    system = platform.system()
    if system == "Darwin":
        return False
    if system == "Linux":
        return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidiactl")
    return True


def total_memory() -> int | None:
    """Bytes of RAM (unified memory on Apple Silicon), or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def free_memory() -> int | None:
    """Bytes that can be had without swapping: MemAvailable on Linux, free + inactive on macOS."""
    try:
        if platform.system() == "Linux":
            with open("/proc/meminfo") as f:
                kb = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
            return int(kb.group(1)) * 1024 if kb else None
        if platform.system() == "Darwin":
            return _vm_stat_free()
    except (OSError, ValueError, subprocess.SubprocessError):
        pass
    return None


def _vm_stat_free() -> int | None:
    text = subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=2).stdout
    page = re.search(r"page size of (\d+) bytes", text)
    kinds = ("free", "inactive", "speculative", "purgeable")
    pages = [re.search(rf"Pages {k}:\s+(\d+)", text) for k in kinds]
    if not page or not any(pages):
        return None
    return int(page.group(1)) * sum(int(p.group(1)) for p in pages if p)


def mlx_budget() -> tuple[int | None, str]:
    """(bytes MLX may use, where that number comes from): Metal's recommended working set,
    else GPU_SHARE of RAM."""
    info = _mlx_device_info()
    limit = info.get("max_recommended_working_set_size")
    if limit:
        return int(limit), "Metal's recommended working set"
    total = total_memory()
    if total is None:
        return None, "unknown"
    return int(total * GPU_SHARE), f"{GPU_SHARE:.0%} of RAM"


def _mlx_device_info() -> dict:
    if importlib.util.find_spec("mlx") is None or platform.system() != "Darwin":
        return {}  # Metal's numbers exist only on a Mac
    import mlx.core as mx

    try:
        if hasattr(mx, "device_info"):
            return dict(mx.device_info())
        return dict(mx.metal.device_info()) if mx.metal.is_available() else {}
    except (RuntimeError, ValueError):
        return {}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set to a true value: huggingface_hub will not touch the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_reachable(timeout: float = 2.0) -> bool:
    """The Hugging Face hub answers within `timeout` seconds (any HTTP status counts)."""
    request = urllib.request.Request(hub_endpoint() + "/api/whoami-v2", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout).close()
    except urllib.error.HTTPError:
        return True  # it answered, if only to say no
    except (OSError, ValueError):
        return False
    return True


def gb(n: int | float | None) -> str:
    """Bytes in decimal gigabytes, as model sizes are quoted."""
    return "unknown" if n is None else f"{n / 1e9:.1f} GB"
