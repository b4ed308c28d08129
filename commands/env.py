"""`pertoken env`: what a bug report needs and what `--backend auto` will do on this machine."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata

import click

PACKAGES = ("pertoken", "torch", "transformers", "mlx", "mlx-lm")


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for machines.")
def env(as_json):
    """What a bug report needs and what --backend auto will do here.

    OS, Python, package versions, backends, default device and dtype, memory, the default
    model per backend and whether it fits, the hub, and whether the judge's key is set (never
    its value)."""
    report = env_report()
    click.echo(json.dumps(report, indent=2) if as_json else format_report(report))


def env_report() -> dict:
    """Every field of `pertoken env`, as plain JSON values (bytes as integers)."""
    from pertoken.backends import BACKENDS, choose, default_settings, is_installed

    names = [b for b in BACKENDS if b != "auto"]
    auto = choose("auto")
    return {
        "os": _os_name(),
        "machine": platform.machine(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "versions": {p: _version(p) for p in PACKAGES},
        "backends": {b: is_installed(b) for b in names},
        "auto": {"backend": auto.backend, "why": auto.reason},
        "defaults": {b: default_settings(b) for b in names if is_installed(b)},
        "memory": _memory(),
        "default_models": {b: _default_model_fit(b) for b in names},
        "hub": _hub(),
        "judge_key": _judge_key(),
    }


def _os_name() -> str:
    if platform.system() == "Darwin":
        return f"macOS {platform.mac_ver()[0]}"
    return f"{platform.system()} {platform.release()}"


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _memory() -> dict:
    from pertoken.backends.machine import free_memory, mlx_budget, this_machine, total_memory

    limit, where = mlx_budget()
    return {
        "kind": "unified" if this_machine().apple_silicon else "system",
        "total": total_memory(),
        "free": free_memory(),
        "mlx_limit": limit,
        "mlx_limit_source": where,
        "cuda": _cuda_memory(),
    }


def _cuda_memory() -> list[dict]:
    """Total and free memory per CUDA device (empty without torch or CUDA)."""
    from pertoken.backends.machine import may_have_cuda

    if _version("torch") is None or not may_have_cuda():
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    cards = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        cards.append({"name": torch.cuda.get_device_name(i), "total": total, "free": free})
    return cards


def _default_model_fit(backend: str) -> dict:
    """The backend's default model and whether its weights fit where that backend runs."""
    from pertoken.backends import default_model
    from pertoken.backends.machine import total_memory
    from pertoken.backends.memory import check_fit

    model = default_model(backend)
    if backend == "mlx":
        fit = check_fit(model)
    else:
        cuda = _cuda_memory()
        budget = (cuda[0]["total"], "CUDA memory") if cuda else (total_memory(), "RAM")
        fit = check_fit(model, dtype="bfloat16" if cuda else "float32", budget=budget)
    weights = fit.weights.bytes if fit.weights else None
    return {"model": model, "fits": fit.fits, "weights": weights, "detail": fit.summary()}


def _hub() -> dict:
    from pertoken.backends.machine import hub_endpoint, hub_offline, hub_reachable

    offline = hub_offline()
    reachable = None if offline else hub_reachable(timeout=2.0)
    return {"endpoint": hub_endpoint(), "offline": offline, "reachable": reachable}


def _judge_key() -> dict:
    """Whether the judge's key is set, and where; never the key itself."""
    from dotenv import dotenv_values, find_dotenv

    from pertoken.pipeline.judge.api import KEY_ENV

    where = None
    if os.environ.get(KEY_ENV, "").strip():
        where = "environment"
    elif (dotenv_values(find_dotenv(usecwd=True)).get(KEY_ENV) or "").strip():
        where = ".env"
    return {"name": KEY_ENV, "present": where is not None, "where": where}


def format_report(r: dict) -> str:
    """The report as aligned `field  value` lines."""
    from pertoken.backends.machine import gb

    mem = r["memory"]
    lines = [("os", r["os"]), ("machine", r["machine"]), ("python", r["python"])]
    lines += [(p, v or "not installed") for p, v in r["versions"].items()]
    lines.append(("backends", ", ".join(b for b, ok in r["backends"].items() if ok) or "none"))
    lines.append(("auto", f"{r['auto']['backend']} ({r['auto']['why']})"))
    for b, d in r["defaults"].items():
        lines.append((f"{b} default", f"device {d['device']}, dtype {d['dtype']}"))
    lines.append(("memory", f"{mem['kind']} {gb(mem['total'])} total, {gb(mem['free'])} free"))
    lines.append(("mlx may use", f"{gb(mem['mlx_limit'])} ({mem['mlx_limit_source']})"))
    for card in mem["cuda"]:
        lines.append(("cuda", f"{card['name']}: {gb(card['total'])}, {gb(card['free'])} free"))
    for b, m in r["default_models"].items():
        lines.append((f"{b} model", m["detail"]))
    lines.append(("hub", _hub_line(r["hub"])))
    key = r["judge_key"]
    lines.append(
        (
            "judge key",
            f"{key['name']} " + (f"set ({key['where']})" if key["present"] else "not set"),
        )
    )
    width = max(len(k) for k, _ in lines) + 2
    return "\n".join(f"{k:<{width}}{v}" for k, v in lines)


def _hub_line(hub: dict) -> str:
    if hub["offline"]:
        return f"offline (HF_HUB_OFFLINE is set; {hub['endpoint']} not tried)"
    return f"{hub['endpoint']} {'reachable' if hub['reachable'] else 'unreachable'}"


COMMANDS = [env]
