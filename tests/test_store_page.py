"""The page of a trace store (trace.html): item list, lazily loaded tokens, modes, heatmap.

A word-level fake backend makes whole markup strings single tokens, so the page must show
`<script>...</script>` as text; the browser test drives headless Chromium from file://."""

import json
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

import pertoken.trace
from pertoken.pipeline.trace import page as store_page
from pertoken.pipeline.trace.dataset import Tracing, trace_dataset
from pertoken.vectors import PersonaVector
from tests import cdp
from tests.fake_backend import FakeBackend

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
EVIL = [
    "<script>window.__pwned=1</script>",
    "</script><script>window.__pwned=3</script>",
    "<img src=x onerror=window.__pwned=2>",
]


class WordBackend(FakeBackend):
    """Tokens are words with their trailing space; ids are hashes of the word."""

    def encode_offsets(self, text):
        spans = [m.span() for m in re.finditer(r"\S+\s*|\s+", text)]
        return [zlib.crc32(text[a:b].encode()) % 0x24F + 1 for a, b in spans], spans

    def encode(self, text):
        return self.encode_offsets(text)[0]


def _chats():
    rng = np.random.default_rng(0)
    words = "you must do it now . it is your choice , feel free".split()
    out = []
    for i in range(5):
        answer = " ".join(rng.choice(words, size=6 + 3 * i))
        if i == 0:
            answer = f"{EVIL[0]} fine {EVIL[1]} <think>{EVIL[2]} hmm</think> ok &amp; done"
        msgs = [{"role": "user", "content": f"question {i} please"},
                {"role": "assistant", "content": answer}]  # fmt: skip
        out.append({"messages": msgs, "score": float((3 * i) % 5), "label": f"<b>{i}</b>"})
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    path = tmp / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in _chats()))
    rng = np.random.default_rng(1)
    vecs = {n: PersonaVector(rng.normal(size=(5, 16)).astype(np.float32)) for n in ("pat", "dec")}
    trace_dataset(
        WordBackend(),
        input=path,
        vectors=vecs,
        rows=[1, 3],
        out_dir=tmp / "out",
        tracing=Tracing(page=False, progress=False),
    )
    return tmp / "out"


@pytest.fixture(scope="module")
def page_path(store):
    old, store_page.BLOCK = store_page.BLOCK, 2  # three data files for five items
    try:
        return store_page.write_store_page(store)
    finally:
        store_page.BLOCK = old


def test_data_files_are_escaped_and_the_page_holds_only_the_index(store, page_path):
    files = sorted((store / "trace_page").glob("items-*.js"))
    assert [f.name for f in files] == ["items-00000.js", "items-00001.js", "items-00002.js"]
    first = files[0].read_text()
    assert first.startswith("pertokenItems({") and first.endswith("});\n")
    assert not re.search(r"[<>&]", first)  # no token text can form markup or close a script
    data = json.loads(first[len("pertokenItems(") : -len(");\n")])
    tokens, _ = pertoken.trace.load(store)
    assert data["0"]["tokens"] == tokens[tokens["item"] == 0]["token"].tolist()
    page = page_path.read_text()
    assert len(re.findall(r"<script\b", page)) == 2  # the index and the page's own code
    block = re.search(r'id="trace-index">(.*?)</script>', page, re.S).group(1)
    index = json.loads(block)  # the item list and scales: no token data inline
    assert set(index) == {"settings", "vectors", "rows", "segments", "columns", "items",
                          "block", "mean", "scale"}  # fmt: skip
    assert len(index["items"]) == 5 and index["columns"][:3] == ["item", "preview", "n_tokens"]


def _eval_values(page):
    return page.eval("[...document.querySelectorAll('.tok')].map(s => Number(s.dataset.value))")


def _select(page, id_, value):
    page.eval(
        f"(() => {{ const s = document.getElementById({id_!r}); s.value = {value!r};"
        "s.dispatchEvent(new Event('change')); })()"
    )


@pytest.mark.slow
def test_store_page_in_headless_chromium(store, page_path, tmp_path):
    binary = cdp.find_chromium()
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    tokens, items = pertoken.trace.load(store)
    with cdp.browser(binary, str(tmp_path / "profile")) as b:
        page = b.open_page(page_path.as_uri())
        page.wait_for("document.body.dataset.item === '0'")
        assert page.eval("document.querySelectorAll('#items tbody tr').length") == 5
        assert page.eval("[...document.scripts].filter(s => s.src).length") == 1  # block 0 only
        item0 = tokens[tokens["item"] == 0]
        texts = page.eval("[...document.querySelectorAll('.tok')].map(s => s.textContent)")
        assert texts == item0["token"].tolist() and any(e in t for e in EVIL for t in texts)
        assert page.eval("typeof window.__pwned") == "undefined"
        assert page.eval("document.querySelectorAll('img').length") == 0
        segs = page.eval("[...document.querySelectorAll('.tok')].map(s => s.dataset.segment)")
        assert segs == item0["segment"].tolist() and "thinking" in segs

        raw = item0["proj.pat.L1"].to_numpy()
        tol = 1e-5 * np.abs(raw).max()
        np.testing.assert_allclose(_eval_values(page), raw, atol=tol)
        _select(page, "layer", "1")
        l3 = item0["proj.pat.L3"].to_numpy()
        np.testing.assert_allclose(_eval_values(page), l3, atol=1e-5 * np.abs(l3).max())
        _select(page, "mode", "centred")
        rest = tokens[tokens["pos"] > 0]["proj.pat.L3"].to_numpy(np.float64)
        centred = l3 - rest.mean()
        np.testing.assert_allclose(_eval_values(page), centred, atol=2e-5 * np.abs(l3).max())
        _select(page, "mode", "cosine")
        np.testing.assert_allclose(_eval_values(page), item0["cos.pat.L3"], atol=1e-5)
        _select(page, "scale", "global")
        want = np.abs(tokens[tokens["pos"] > 0]["cos.pat.L3"]).max()
        assert float(page.eval("document.getElementById('scale-hi').textContent")) == (
            pytest.approx(want, abs=1e-3)
        )

        # sort by score, then pick the last row: its block loads on demand
        page.eval("document.querySelector('th[data-col=score]').click()")
        order = page.eval(
            "[...document.querySelectorAll('#items tbody tr')].map(r => r.dataset.item)"
        )
        by_score = items.sort_values("score", kind="stable")["item"].astype(str).tolist()
        assert order == by_score
        page.eval("document.querySelector('tr[data-item=\"4\"]').click()")
        page.wait_for("document.body.dataset.item === '4'")
        assert page.eval("[...document.scripts].filter(s => s.src).length") == 2
        item4 = tokens[tokens["item"] == 4]
        assert page.eval("document.querySelectorAll('.tok').length") == len(item4)
        assert page.eval("document.querySelectorAll('#heat rect').length") == 2 * len(item4)

        # smoothing changes the line but keeps a point per token
        _select(page, "mode", "raw")
        plain = page.eval("document.getElementById('line').getAttribute('points')")
        _select(page, "smooth", "5")
        smooth = page.eval("document.getElementById('line').getAttribute('points')")
        assert plain != smooth and len(smooth.split()) == len(plain.split()) == len(item4)

        page.eval("document.querySelector('tr[data-item=\"0\"]').click()")
        page.wait_for("document.body.dataset.item === '0'")
        ARTIFACTS.mkdir(exist_ok=True)
        shot = page.screenshot()
        (ARTIFACTS / "store_page.png").write_bytes(shot)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
