"""The server's `steer` operators: add, ablate, cap and `when` mixed across requests in the
running slot loop, each request getting its solo tokens; bad terms are one-line 400s."""

import importlib.util
import json
import threading

import httpx
import pytest

from pertoken.backends import Steer, load_backend
from pertoken.backends.base import Condition
from tests.serve_helpers import arriving_together, ask, client, serving, vectors

BACKENDS = ["torch"] + (["mlx"] if importlib.util.find_spec("mlx_lm") else [])
QUESTION = "What should I do about money?"
COND = {"vector": "blunt", "layer": 1, "above": -1e6}  # holds for every prompt
SETTINGS = [
    [{"vector": "kind", "layer": 2, "op": "add", "coef": 6.0}],
    [{"vector": "kind", "layer": 2, "op": "ablate"}, {"vector": "blunt", "layer": 1, "coef": 4}],
    [{"vector": "blunt", "layer": 3, "op": "cap", "hi": -0.5}],
    [{"vector": "kind", "layer": 1, "op": "cap", "lo": 1.0, "hi": 2.0, "when": COND}],
    [],
]


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, llama_dir):
    load = lambda: load_backend(str(llama_dir), request.param, dtype="float32", device="cpu")  # noqa: E731
    with serving(load()) as run:
        yield run, client(run), load()


def _steer(terms) -> Steer | None:
    vecs, out = vectors(), []
    for t in terms:
        v = vecs[t["vector"]].row(t["layer"])
        w = t.get("when")
        when = (
            None
            if w is None
            else Condition(w["layer"], vecs[w["vector"]].row(w["layer"]), w["above"])
        )
        if t.get("op", "add") == "add":
            out.append(Steer.add(t["layer"], v, t["coef"], positions="response", when=when))
        elif t["op"] == "ablate":
            out.append(Steer.ablate(t["layer"], v, positions="response", when=when))
        else:
            out.append(
                Steer.cap(
                    t["layer"], v, lo=t.get("lo"), hi=t.get("hi"), positions="response", when=when
                )
            )
    return Steer([x for s in out for x in s.terms], "response") if out else None


def test_requests_mixing_operators_in_one_batch_get_their_solo_tokens(served):
    run, c, ref = served
    prompt = ref.chat_prompt(None, QUESTION)
    kw = dict(max_new_tokens=10, temperature=0)
    solo = [ref.generate([prompt], steer=_steer(t), **kw)[0] for t in SETTINGS]
    assert len(set(solo)) == len(SETTINGS)  # every setting changes the answer
    got = [None] * len(SETTINGS)

    def one(i):
        r = c.chat.completions.create(
            model=ref.model_id, messages=ask(QUESTION), max_tokens=10, temperature=0,
            extra_body={"steer": SETTINGS[i]},
        )  # fmt: skip
        got[i] = r.choices[0].message.content

    with arriving_together(run.engine, len(SETTINGS)) as loop:  # all in the loop at once
        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(SETTINGS))]
        [t.start() for t in threads]
        [t.join(60) for t in threads]
    assert got == solo
    assert loop["peak"] == len(SETTINGS)


def _add_when(when: dict) -> dict:
    return {"vector": "kind", "layer": 2, "coef": 1.0, "when": when}


BAD = [
    ("unknown op", {"vector": "kind", "layer": 2, "op": "scale"}, "unknown op"),
    ("hi below lo", {"vector": "kind", "layer": 2, "op": "cap", "lo": 2, "hi": 1}, "below lo"),
    ("cap without bounds", {"vector": "kind", "layer": 2, "op": "cap"}, "needs a lower bound"),
    ("NaN bound", {"vector": "kind", "layer": 2, "op": "cap", "hi": float("nan")}, "number"),
    ("overflowing coef", {"vector": "kind", "layer": 2, "coef": 1e39}, "overflows float32"),
    ("absurd threshold", {"vector": "kind", "layer": 2, "op": "cap", "hi": 1e300}, "beyond any"),
    ("when of no vector", _add_when({"vector": "x", "layer": 1, "above": 0}), "unknown vector"),
    ("when without side", _add_when({"vector": "kind", "layer": 1}), "above"),
]  # fmt: skip


@pytest.mark.parametrize("name, term, words", BAD, ids=[b[0] for b in BAD])
def test_bad_terms_are_one_line_400s(served, name, term, words):
    run, _, ref = served
    body = {"model": ref.model_id, "messages": ask("hi"), "max_tokens": 2, "steer": [term]}
    r = httpx.post(run.url + "/v1/chat/completions", content=json.dumps(body),
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert words in message and "\n" not in message


@pytest.mark.slow
def test_lab_page_operator_picker_sends_each_operator(llama_dir, tmp_path, torch_one_thread):
    from tests import cdp
    from tests.test_serve_page import _send, _slider

    binary = cdp.find_chromium()
    if binary is None:
        pytest.fail("chromium is not installed: apt-get install -y chromium (.ci/run does this)")
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    with serving(bk, max_tokens=16) as run, cdp.browser(binary, str(tmp_path / "p")) as b:
        page = b.open_page(run.url + "/")
        page.wait_for("document.body.dataset.ready === '1'")
        page.eval("document.getElementById('max-tokens').value = '10'")
        for op, value, words, term in [
            ("cap", -1.6, "kind@2 cap \u2264 -1.60", {"op": "cap", "hi": -1.6}),  # on a step
            ("ablate", 0, "kind@2 ablated", {"op": "ablate"}),
        ]:
            page.eval(
                "(() => { const s = document.getElementById('op-0');"
                f" s.value = '{op}'; s.dispatchEvent(new Event('change')); }})()"
            )
            _slider(page, value)
            page.eval("document.getElementById('new-chat').click()")
            got = _send(page, QUESTION)
            assert words in page.eval("document.querySelector('.reply h3').textContent")
            steer = [{"vector": "kind", "layer": 2, **term}]
            body = {"model": bk.model_id, "messages": ask(QUESTION), "max_tokens": 10,
                    "temperature": 0, "steer": steer}  # fmt: skip
            want = httpx.post(run.url + "/v1/chat/completions", json=body, timeout=60).json()
            assert got == want["choices"][0]["message"]["content"]


def test_the_trace_browser_offers_pre_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pertoken.serve.traces import TraceStores
    from tests.serve_helpers import write_store

    folder = write_store(tmp_path / "capped")
    table = pq.read_table(folder / "tokens.parquet")
    pre = pa.array([float(i) for i in range(table.num_rows)], pa.float32())
    pq.write_table(table.append_column("pre.kind.L2", pre), folder / "tokens.parquet")
    got = TraceStores([folder]).tokens("capped", "0")
    assert {"proj.kind.L2", "pre.kind.L2"} <= set(got["values"])
    assert got["values"]["pre.kind.L2"][:3] == [0.0, 1.0, 2.0]
