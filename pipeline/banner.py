"""The lines a long command prints before any work: what it will use and where it writes."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    from pertoken.pipeline.options import JudgeSettings, ModelChoice

OPENAI_URL = "https://api.openai.com/v1"


def banner(
    model: ModelChoice,
    judging: JudgeSettings,
    folder,
    *,
    why: dict[str, str] | None = None,
    plan: str | None = None,
) -> str:
    """Aligned `name  value` lines for a model whose backend, device and dtype are chosen,
    its judge and output folder; `why` may add a reason to any of them (by name); `plan`
    says how much work the command will do."""
    endpoint = judge_endpoint(judging.judge_model, judging.base_url)
    rows = {
        "model": model.model,
        "backend": model.backend,
        "device": model.device,
        "dtype": model.dtype,
        "judge": f"{judging.judge_model} at {endpoint}",
        "output": str(folder),
    } | ({"plan": plan} if plan else {})
    why = why or {}
    width = max(map(len, rows))
    return "\n".join(
        f"{name:<{width}}  {value}" + (f"  ({why[name]})" if name in why else "")
        for name, value in rows.items()
    )


def judge_endpoint(judge_model: str, base_url: str | None) -> str:
    """Where the judge's requests go, without any user:password in the URL."""
    if judge_model.startswith("local:"):
        return "this machine (in-process)"
    return strip_userinfo(base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_URL)


def strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def duration(seconds: float) -> str:
    """`42 s`, `17 min`, `3.4 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
