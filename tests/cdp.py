"""A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (no network, no ports).

Chromium reads NUL-terminated JSON commands on fd 3 and writes replies and events on fd 4.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
    "--remote-debugging-pipe",
]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


REQUIRE_BROWSER = "PERTOKEN_REQUIRE_BROWSER"  # set (to 1) by .ci/run


def require_chromium() -> str:
    """The Chromium binary. Without one the calling test is skipped with the reason, or fails
    where PERTOKEN_REQUIRE_BROWSER is set (CI must not pass by skipping its browser tests)."""
    import pytest

    binary = find_chromium()
    if binary is None:
        reason = "chromium is not installed (apt-get install -y chromium)"
        if os.environ.get(REQUIRE_BROWSER, "") not in ("", "0"):
            pytest.fail(f"{reason}, and {REQUIRE_BROWSER} asks for the browser tests to run")
        pytest.skip(f"{reason}: browser test skipped")
    return binary


class Browser:
    def __init__(self, proc, cmd_w: int, resp_r: int):
        self.proc, self.cmd_w, self.resp_r = proc, cmd_w, resp_r
        self.next_id, self.buf = 0, b""

    def send(
        self,
        method: str,
        params: dict | None = None,
        *,
        session: str | None = None,
        timeout: float = 20.0,
    ) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def _read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.resp_r], [], [], left)[0]:
                raise TimeoutError("chromium did not answer in time")
            chunk = os.read(self.resp_r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the debugging pipe")
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def open_page(self, url: str, *, width=1200, height=900) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        sid = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, sid)
        page.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        page.call("Page.navigate", {"url": url})
        page.wait_for("document.readyState === 'complete'")
        return page


class Page:
    def __init__(self, browser: Browser, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, params: dict | None = None) -> dict:
        return self.browser.send(method, params, session=self.session)

    def eval(self, expression: str):
        """The JSON value of a JavaScript expression evaluated in the page."""
        res = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, condition: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eval(f"!!({condition})"):
            if time.monotonic() > deadline:
                raise TimeoutError(f"page never satisfied {condition}")
            time.sleep(0.05)

    def hover(self, x: float, y: float) -> None:
        self.call("Input.dispatchMouseEvent", {"type": "mouseMoved", "x": x, "y": y})

    def screenshot(self) -> bytes:
        import base64

        return base64.b64decode(self.call("Page.captureScreenshot", {"format": "png"})["data"])


@contextmanager
def browser(binary: str, profile_dir: str):
    """A headless Chromium driven over pipes; killed on exit."""
    cmd_r, cmd_w = os.pipe()
    resp_r, resp_w = os.pipe()

    def child_fds():
        # Lift both ends above 9 first so placing one on fd 3 or 4 cannot clobber the other.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, resp_w)]
        os.dup2(high[0], 3)
        os.dup2(high[1], 4)

    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
        preexec_fn=child_fds,
        close_fds=False,
        start_new_session=True,  # its renderer processes share one group to end together
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(cmd_r)
    os.close(resp_w)
    b = Browser(proc, cmd_w, resp_r)
    try:
        yield b
    finally:
        try:
            b.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass  # it may close the pipe before it answers
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        os.close(cmd_w)
        os.close(resp_r)
