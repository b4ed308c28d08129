"""trace.html: one self-contained page (inline CSS/JS, no network) showing trace records.

The records are embedded as JSON in a <script type="application/json"> block with `<`, `>` and
`&` written as \\u escapes, so no token text can close the block; the page renders tokens with
textContent only, so a token like `<script>` shows as text and never runs.
"""

from __future__ import annotations

import html
from pathlib import Path

from pertoken.pipeline.trace.page import embed_json

_TEMPLATE = Path(__file__).with_name("monitor_page.html")


def render_page(records: list[dict], *, title: str = "pertoken trace") -> str:
    """The HTML text of a page showing `records` (see pipeline/monitor.py for their fields)."""
    head, tail = _TEMPLATE.read_text(encoding="utf-8").split("__DATA__")
    return head.replace("__TITLE__", html.escape(title)) + embed_json(records) + tail


def write_page(records: list[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Write the page for `records` to `path` and return the path."""
    path = Path(path)
    if title is None:
        first = records[0].get("prompt") or "" if records else ""
        title = f"pertoken trace: {first[:60]}" if first else "pertoken trace"
    path.write_text(render_page(records, title=title), encoding="utf-8")
    return path
