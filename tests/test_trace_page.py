"""The page of a monitor run (its trace store's trace.html): token text shown as text, values
per vector and layer, the tooltip with SAE features, the chart; driven in headless Chromium."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

import pertoken.trace
from pertoken.backends.base import TokenTrace
from pertoken.pipeline.monitor import trace_record, write_outputs
from pertoken.pipeline.trace import page as store_page
from pertoken.pipeline.trace.monitored import Items, store_settings
from pertoken.vectors import PersonaVector
from tests import cdp

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EVIL = [
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=3</script>",
    "<img src=x onerror=window.__pwned=2>",
]
TOKENS = ["Hello", ",", " I", " will", " write", " ", *EVIL, "\n", " and", " stop", " &amp;", "."]
NAMES, LAYERS = ["paternalism", "deception"], [4, 9]


class Model:
    model_id, name, dtype = "tiny", "fake", "float32"


def _records():
    """Two answers whose colours differ between layers: layer 1 flips the sign of layer 0;
    (record, captured states [T, R, hidden]) each."""
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(2, 2, 8)).astype(np.float32)  # [K, L, hidden]
    dirs[:, 1] = dirs[:, 0]
    out = []
    for label, sign in (("answer (unsteered)", 1.0), ("answer (steered)", -0.5)):
        base = rng.normal(size=(len(TOKENS), 8)).astype(np.float32)
        hidden = np.stack([sign * base, -3 * sign * base], axis=1)  # [T, 2, hidden]
        trace = TokenTrace("p", "".join(TOKENS), TOKENS, list(range(len(TOKENS))), LAYERS, hidden)
        rec = trace_record(trace, names=NAMES, directions=dirs, layers=LAYERS)
        rec.update(label=label, prompt="Say <b>hi</b>", system=None, chat_prompt="p")
        rec["settings"] = {"model": "tiny"}
        out.append((rec, hidden))
    out[0][0]["features"] = [[{"id": 100 + i, "act": 0.5 * i}] for i in range(len(TOKENS))]
    return out, dirs


def _write(folder):
    pairs, dirs = _records()
    items = Items(NAMES, LAYERS, None)
    for rec, hidden in pairs:
        items.add(rec, hidden, prompt_len=3)
    vecs = {n: PersonaVector(np.zeros((10, 8), np.float32)) for n in NAMES}
    for k, n in enumerate(NAMES):
        vecs[n].data[LAYERS] = dirs[k]
    settings = store_settings(Model(), NAMES, vecs, {}, LAYERS, None, None)
    recs = [rec for rec, _ in pairs]
    return write_outputs(items, recs, settings, folder), recs


def test_embedded_json_cannot_close_its_script_block():
    text = store_page.embed_json({"t": "</script><script>x()</script>", "u": "a\u2028b & c"})
    assert "<" not in text and ">" not in text and "&" not in text
    assert json.loads(text) == {"t": "</script><script>x()</script>", "u": "a\u2028b & c"}
    template = store_page._TEMPLATE.read_text()
    page = store_page.render(template, "</title><script>", store_page.embed_json({"t": EVIL}))
    assert "<title>&lt;/title&gt;&lt;script&gt;</title>" in page
    assert len(re.findall(r"<script\b", page)) == 2  # the data block and the page's own code
    assert "const Kit = " in page  # the page kit inlined: the page needs no network


def test_an_answer_with_no_tokens_keeps_its_place(tmp_path):
    """A monitored answer cut off at once is an item with no tokens: the page's data files
    still hold every item at its place, so the next item loads its own tokens."""
    (first, h), _ = _records()[0]
    dirs = np.ones((2, 2, 8), np.float32)
    empty = TokenTrace("p", "", [], [], LAYERS, np.zeros((0, 2, 8), np.float32))
    none = trace_record(empty, names=NAMES, directions=dirs, layers=LAYERS)
    none.update(label="empty", prompt="q", system=None, chat_prompt="p", settings={})
    items = Items(NAMES, LAYERS, None)
    for rec, hidden in ((first, h), (none, np.zeros((0, 2, 8))), (first, h)):
        items.add(rec, hidden, prompt_len=3)
    vecs = {n: PersonaVector(np.ones((10, 8), np.float32)) for n in NAMES}
    settings = store_settings(Model(), NAMES, vecs, {}, LAYERS, None, None)
    old, store_page.BLOCK = store_page.BLOCK, 2
    try:
        write_outputs(items, [first, none, first], settings, tmp_path)
    finally:
        store_page.BLOCK = old
    blocks = sorted((tmp_path / "trace_page").glob("items-*.js"))
    data = [json.loads(b.read_text()[len("pertokenItems(") : -len(");\n")]) for b in blocks]
    assert [list(d) for d in data] == [["0", "1"], ["2"]]
    assert data[0]["1"]["tokens"] == [] and data[0]["1"]["proj"] == [[[], []], [[], []]]
    assert data[1]["2"]["tokens"] == TOKENS
    assert pertoken.trace.load(tmp_path)[1]["n_tokens"].tolist() == [len(TOKENS), 0, len(TOKENS)]


def test_missing_chromium_skips_with_a_reason_or_fails_when_required(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no browser in it
    monkeypatch.delenv(cdp.REQUIRE_BROWSER, raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        cdp.require_chromium()
    monkeypatch.setenv(cdp.REQUIRE_BROWSER, "0")
    with pytest.raises(pytest.skip.Exception):
        cdp.require_chromium()
    monkeypatch.setenv(cdp.REQUIRE_BROWSER, "1")
    with pytest.raises(pytest.fail.Exception, match="PERTOKEN_REQUIRE_BROWSER asks"):
        cdp.require_chromium()
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert cdp.require_chromium() == str(fake)


@pytest.mark.slow
def test_trace_page_in_headless_chromium(tmp_path):
    binary = cdp.require_chromium()
    page_path, recs = _write(tmp_path / "out")
    n = len(TOKENS)
    with cdp.browser(binary, str(tmp_path / "profile")) as b:
        page = b.open_page(page_path.as_uri())
        page.wait_for("document.body.dataset.item === '0'")
        assert page.eval("document.querySelectorAll('#items tbody tr').length") == 2
        assert page.eval("document.querySelectorAll('.tok').length") == n
        # Token text arrives as text: the injected markup is visible and nothing ran.
        texts = page.eval("[...document.querySelectorAll('.tok')].map(s => s.textContent)")
        assert texts == TOKENS
        assert page.eval("typeof window.__pwned") == "undefined"
        assert page.eval("document.querySelectorAll('img').length") == 0
        assert page.eval("[...document.scripts].filter(s => !s.src).length") == 2

        layer0 = _shown(page)
        _assert_values(layer0, recs[0], vector=0, layer=0)
        assert len({c for _, c in layer0}) > 5  # tokens carry several distinct colours
        assert all(c.startswith("rgb(") for _, c in layer0)

        _select(page, "layer", "1")
        layer1 = _shown(page)
        _assert_values(layer1, recs[0], vector=0, layer=1)
        changed = sum(a[1] != b[1] for a, b in zip(layer0, layer1, strict=True))
        assert changed > n // 2  # layer 9 flips the signs, so most colours change
        assert page.eval("document.getElementById('scale-hi').textContent").startswith("+")

        # Hover over the first script token: the tooltip names it and gives exact values.
        box = page.eval(
            "(() => { const r = document.querySelectorAll('.tok')[6]"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2];"
            " })()"
        )
        page.hover(*box)
        page.wait_for("document.getElementById('tip').style.display === 'block'")
        tip = page.eval("document.getElementById('tip').textContent")
        assert json.dumps(EVIL[0]) in tip
        value = recs[0]["projections"][6][0][1]
        assert f"{value:+.4f}" in tip and "SAE features: #106 (3.000)" in tip

        # The other vector, the second answer, and hovering its chart near its end.
        _select(page, "vector", "1")
        page.eval("document.querySelector('tr[data-item=\"1\"]').click()")
        page.wait_for("document.body.dataset.item === '1'")
        _assert_values(_shown(page), recs[1], vector=1, layer=1)
        x, y = page.eval(
            "(() => { const c = document.getElementById('chart');"
            "c.scrollIntoView({block: 'center'}); const r = c.getBoundingClientRect();"
            "return [r.right - 12, r.y + r.height / 2]; })()"
        )
        page.hover(x, y)
        assert page.eval("document.querySelectorAll('.tok.hl').length") == 1
        assert page.eval("document.querySelector('.tok.hl').dataset.index") == str(n - 1)
        page.eval("document.querySelector('tr[data-item=\"0\"]').click()")
        page.wait_for("document.body.dataset.item === '0'")
        _select(page, "vector", "0")
        _select(page, "layer", "0")
        page.eval("window.scrollTo(0, 0)")
        page.hover(*box)

        ARTIFACTS.mkdir(exist_ok=True)
        shot = page.screenshot()
        (ARTIFACTS / "trace_page.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000


def _select(page, id_, value):
    page.eval(
        f"(() => {{ const s = document.getElementById({id_!r}); s.value = {value!r};"
        "s.dispatchEvent(new Event('change')); })()"
    )


def _shown(page):
    """(data-value, background colour) of every token span, in page order."""
    return page.eval(
        "[...document.querySelectorAll('.tok')]"
        ".map(s => [Number(s.dataset.value), getComputedStyle(s).backgroundColor])"
    )


def _assert_values(shown, rec, *, vector, layer):
    """The page's values are the record's, to the six digits the page keeps."""
    want = np.array([p[vector][layer] for p in rec["projections"]])
    np.testing.assert_allclose([v for v, _ in shown], want, atol=1e-5 * np.abs(want).max())
