"""The lab page in headless Chromium against a live server: chat with streamed coloured tokens,
a slider that changes the next reply, compare, edit, text-only rendering, the trace browser."""

from pathlib import Path

import httpx
import pytest
import torch

from pertoken.backends import load_backend
from pertoken.serve.traces import TraceStores
from tests import cdp
from tests.serve_helpers import STORE_TOKENS, serving, write_store

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
Q = "What should I do about money?"
EVIL = "<script>window.__pwned=1</script><img src=x onerror=window.__pwned=2>"


class Forcer:
    """An lm_head hook that, once armed, makes the model write `text` and stop."""

    def __init__(self, backend, text: str):
        self.ids = backend.encode(text) + [int(backend.stop_ids[0])]
        self.step = None

    def __call__(self, _module, _args, logits):  # [B, t, vocab]
        if self.step is None:
            return logits
        forced = torch.full_like(logits, -1e4)
        forced[..., self.ids[self.step]] = 0.0
        self.step = None if self.step + 1 == len(self.ids) else self.step + 1
        return forced


@pytest.mark.slow
def test_lab_page_in_headless_chromium(llama_dir, tmp_path, torch_one_thread):
    binary = cdp.find_chromium()
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    forcer = Forcer(bk, EVIL)
    bk.model.lm_head.register_forward_hook(forcer)
    stores = TraceStores([write_store(tmp_path / "stores" / "evil-run")])
    with (
        serving(bk, max_tokens=64, traces=stores) as run,
        cdp.browser(binary, str(tmp_path / "p")) as b,
    ):
        page = b.open_page(run.url + "/")
        page.wait_for("document.body.dataset.ready === '1'")
        page.eval("document.getElementById('max-tokens').value = '16'")

        first = _send(page, Q)
        assert len(first) > 3
        colours = _each(page, ".reply .tok", "getComputedStyle(e).backgroundColor")
        assert len(set(colours)) > 2 and all(c.startswith("rgb(") for c in colours)
        values = _each(page, ".reply .tok", "e.dataset.value")
        assert all(v not in ("", None) for v in values)  # every token carries its projection

        # A slider moved: the next reply to the same message differs, and says how it was steered.
        _slider(page, 6)
        second = _send(page, Q)
        assert second != first
        assert "kind@" in page.eval("document.querySelectorAll('.reply h3')[1].textContent")

        # Compare: the third turn steered and unsteered side by side, each as the API answers
        # the whole conversation. Then edit the first turn: the later turns go.
        page.eval("document.getElementById('compare').checked = true")
        _send(page, Q, replies=2)
        assert _each(page, ".turn:nth-child(3) .reply", "e.dataset.label") == [
            "steered",
            "unsteered",
        ]
        chat = [("user", Q), ("assistant", first), ("user", Q), ("assistant", second), ("user", Q)]
        messages = [{"role": r, "content": c} for r, c in chat]
        kind = [{"vector": "kind", "layer": 2, "coef": 6.0}]
        for i, steer in enumerate((kind, [])):
            assert _texts(page, turn=2, reply=i) == _answer(run, bk, messages, steer)
        assert page.eval("document.querySelectorAll('#chart polyline').length") == 2
        page.eval("document.getElementById('compare').checked = false")
        page.eval("document.querySelector('.turn .user .actions button').click()")
        page.eval(
            "document.querySelector('.turn .user textarea').value = 'hi there';"
            "document.querySelector('.turn .user .actions button').click()"
        )
        page.wait_for(
            "document.body.dataset.busy === '0' && document.querySelectorAll('.turn').length === 1"
        )
        assert page.eval("document.querySelector('.turn .user .text').textContent") == "hi there"

        # Hover: every vector x row value of that token.
        page.hover(*_centre(page, ".reply .tok"))
        page.wait_for("document.getElementById('tip').style.display === 'block'")
        tip = page.eval("document.getElementById('tip').textContent")
        assert all(f"{v} @ layer {r}" in tip for v in ("kind", "blunt") for r in (2, 4))

        # A model answer with markup shows as text and runs nothing.
        page.eval("document.getElementById('new-chat').click()")
        page.eval("document.getElementById('max-tokens').value = '64'")
        forcer.step = 0
        evil = _send(page, "Write some HTML")
        assert evil == EVIL
        assert page.eval("typeof window.__pwned") == "undefined"
        assert page.eval("document.querySelectorAll('#turns img, #turns script').length") == 0
        # the page's own scripts (the page kit, then the lab's three), nothing more
        srcs = page.eval("[...document.scripts].map(s => new URL(s.src).pathname)")
        assert srcs == [f"/static/{n}.js" for n in ("kit", "common", "chat", "traces")]

        ARTIFACTS.mkdir(exist_ok=True)
        page.eval("document.getElementById('new-chat').click()")
        _slider(page, 0)
        page.eval("document.getElementById('compare').checked = true")
        page.eval("document.getElementById('max-tokens').value = '40'")
        _send(page, "Explain why the sky is blue.", replies=1)
        _slider(page, 1.5)
        _send(page, "Explain why the sky is blue.", replies=2)
        page.hover(*_centre(page, ".turn:nth-child(2) .tok"))
        shot = page.screenshot()
        (ARTIFACTS / "serve_lab.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000

        # The trace browser: items sorted by score, an item's tokens coloured as text.
        page.eval("document.getElementById('tab-traces').click()")
        page.wait_for("document.querySelectorAll('#items tr.item').length === 2")
        page.eval(
            "(() => { const s = document.getElementById('sort'); s.value = 'evil';"
            "s.dispatchEvent(new Event('change')); })()"
        )
        assert _each(page, "#items tr.item", "e.dataset.item") == ["1", "0"]
        page.eval("document.querySelector('#items tr.item').click()")
        page.wait_for(
            f"document.querySelectorAll('#item-tokens .tok').length === {len(STORE_TOKENS)}"
        )
        assert _each(page, "#item-tokens .tok", "e.textContent") == STORE_TOKENS
        shown = _each(page, "#item-tokens .tok", "Number(e.dataset.value)")
        assert shown == [float(i - 3) for i in range(len(STORE_TOKENS))]
        assert page.eval("document.querySelectorAll('#item-tokens b').length") == 0
        (ARTIFACTS / "serve_traces.png").write_bytes(page.screenshot())


def _slider(page, value: float) -> None:
    """Move the first vector's coefficient slider (as a drag would: value, then `input`)."""
    page.eval(
        "(() => { const c = document.getElementById('coef-0');"
        f" c.value = '{value}'; c.dispatchEvent(new Event('input')); }})()"
    )


def _answer(run, bk, messages, steer, max_tokens=16) -> str:
    body = {"model": bk.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    r = httpx.post(run.url + "/v1/chat/completions", json=body | {"steer": steer}, timeout=60)
    return r.json()["choices"][0]["message"]["content"]


def _send(page, text: str, replies: int = 1) -> str:
    """Type a message and press Enter; wait for the replies; the first reply's text."""
    n = page.eval("document.querySelectorAll('.turn').length")
    page.eval("document.getElementById('input').focus()")
    page.call("Input.insertText", {"text": text})
    enter = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", **enter})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", **enter})
    done = f"document.querySelectorAll('.turn').length === {n + 1}"
    page.wait_for(done + " && document.body.dataset.busy === '0'", timeout=60)
    assert len(_each(page, f".turn:nth-child({n + 1}) .reply", "e")) == replies
    assert page.eval("document.getElementById('status').textContent") == ""
    return _texts(page, turn=n, reply=0)


def _texts(page, *, turn: int, reply: int) -> str:
    return _each(page, f".turn:nth-child({turn + 1}) .reply .tokens", "e.textContent")[reply]


def _each(page, selector: str, expr: str) -> list:
    """`expr` (of element e) for every element matching `selector`."""
    return page.eval(f"[...document.querySelectorAll({selector!r})].map(e => {expr})")


def _centre(page, selector: str) -> list[float]:
    return page.eval(
        f"(() => {{ const r = document.querySelector({selector!r}).getBoundingClientRect();"
        " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
    )


@pytest.mark.slow
def test_lab_page_controls_in_headless_chromium(llama_dir, tmp_path, torch_one_thread):
    """An exact coefficient typed in a number box, a visible busy indicator while a reply
    streams, a colour key under the compare chart, separators between a trace item's turns."""
    binary = cdp.find_chromium()
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    stores = TraceStores([write_store(tmp_path / "stores" / "run")])
    with (
        serving(bk, max_tokens=64, traces=stores) as run,
        cdp.browser(binary, str(tmp_path / "p")) as b,
    ):
        page = b.open_page(run.url + "/")
        page.wait_for("document.body.dataset.ready === '1'")
        page.eval("document.getElementById('max-tokens').value = '12'")
        # every change of the busy flag records whether the indicator showed
        page.eval(
            "window.__busy = []; new MutationObserver(() => window.__busy.push(["
            "document.body.dataset.busy, getComputedStyle(document.getElementById('busy'))"
            ".display])).observe(document.body, {attributes: true})"
        )
        page.eval(
            "(() => { const e = document.getElementById('exact-0'); e.value = '2.375';"
            " e.dispatchEvent(new Event('input')); })()"
        )
        page.eval("document.getElementById('compare').checked = true")
        _send(page, Q, replies=2)
        shown = [[busy, display != "none"] for busy, display in page.eval("window.__busy")]
        assert shown == [["1", True], ["0", False]]
        head = page.eval("document.querySelector('.reply h3').textContent")
        assert "kind@2 +2.375" in head
        kind = [{"vector": "kind", "layer": 2, "coef": 2.375}]
        messages = [{"role": "user", "content": Q}]
        assert _texts(page, turn=0, reply=0) == _answer(run, bk, messages, kind, 12)
        # the chart's key: one swatch per line, in the line's colour
        keys = _each(page, "#chart-key .key", "e.textContent")
        assert len(keys) == 2 and keys[0].startswith("steered") and keys[1] == "unsteered"
        swatches = _each(page, "#chart-key .swatch", "getComputedStyle(e).backgroundColor")
        strokes = _each(page, "#chart polyline", "getComputedStyle(e).stroke")
        assert swatches == strokes and len(set(strokes)) == 2

        page.eval("document.getElementById('tab-traces').click()")
        page.wait_for("document.querySelectorAll('#items tr.item').length === 2")
        page.eval("document.querySelector('#items tr.item').click()")
        page.wait_for("document.querySelectorAll('#item-tokens .tok').length > 0")
        seps = _each(page, "#item-tokens .turn-sep", "e.textContent")
        assert seps == ["turn 1 · assistant"]
        before = page.eval(
            "[...document.getElementById('item-tokens').children]"
            ".findIndex(e => e.classList.contains('turn-sep'))"
        )
        assert before == 5  # after the prompt's five tokens
        assert _each(page, "#item-tokens .tok", "e.textContent") == STORE_TOKENS
