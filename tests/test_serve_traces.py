"""Trace stores read for the lab page: found by folder, served by name, one item at a time."""

import httpx
import pytest

from pertoken.errors import PertokenError
from pertoken.serve.traces import TraceStores
from tests.serve_helpers import STORE_TOKENS, serving, write_store


def test_stores_items_and_tokens(tmp_path):
    write_store(tmp_path / "runs" / "a")
    write_store(tmp_path / "runs" / "b")
    direct = write_store(tmp_path / "other" / "a")
    stores = TraceStores([tmp_path / "runs", direct])
    assert [s["name"] for s in stores.listing()] == ["a", "b", "a-2"]
    items = stores.items("b")
    assert items["columns"][:3] == ["item", "question_id", "evil"] and items["total"] == 2
    assert items["rows"][1][:3] == [1, "evil_1", 88.0]
    one = stores.tokens("a-2", "1")
    assert one["fields"]["token"] == STORE_TOKENS
    assert one["fields"]["segment"][-1] == "answer"
    assert set(one["values"]) == {"proj.kind.L2", "proj.blunt.L2", "norm.L2"}
    assert one["values"]["proj.blunt.L2"][0] == 3.0 - len(STORE_TOKENS)


def test_a_folder_without_stores_is_a_clear_error(tmp_path):
    with pytest.raises(PertokenError, match="holds no trace store"):
        TraceStores([tmp_path])


def test_trace_routes_refuse_unknown_names(llama_dir, tmp_path):
    from pertoken.backends import load_backend

    bk = load_backend(str(llama_dir), "torch", dtype="float32")
    stores = TraceStores([write_store(tmp_path / "s")])
    with serving(bk, traces=stores) as run:
        assert httpx.get(run.url + "/api/traces").json()["stores"] == [{"name": "s", "items": 2}]
        for path, status in [
            ("/api/traces/nope/items", 404),
            ("/api/traces/..%2F..%2Fetc/items", 404),
            ("/api/traces/s/tokens?item=7", 404),
            ("/api/traces/s/tokens?item=x", 400),
            ("/static/..%2Fapp.py", 404),
        ]:
            r = httpx.get(run.url + path)
            assert r.status_code == status, path
            assert r.json()["error"]["message"]
        ok = httpx.get(run.url + "/api/traces/s/tokens?item=0").json()
        assert ok["fields"]["token"] == STORE_TOKENS


def test_a_damaged_store_is_listed_as_damaged_and_the_others_still_served(llama_dir, tmp_path):
    from pertoken.backends import load_backend

    write_store(tmp_path / "runs" / "good")
    bad = write_store(tmp_path / "runs" / "bad")
    (bad / "items.parquet").write_bytes(b"PAR1 not really")
    (bad / "tokens.parquet").write_bytes((bad / "tokens.parquet").read_bytes()[:100])
    bk = load_backend(str(llama_dir), "torch", dtype="float32")
    with serving(bk, traces=TraceStores([tmp_path / "runs"])) as run:
        listing = httpx.get(run.url + "/api/traces").json()["stores"]
        assert [s["name"] for s in listing] == ["bad", "good"]
        assert "tokens.parquet" in listing[0]["damaged"]
        assert "pertoken trace" in listing[0]["damaged"] and "items" not in listing[0]
        assert listing[1] == {"name": "good", "items": 2}
        for path in ("/api/traces/bad/items", "/api/traces/bad/tokens?item=0"):
            r = httpx.get(run.url + path)
            assert r.status_code == 409 and r.json()["error"]["code"] == "damaged_store", path
        assert httpx.get(run.url + "/api/traces/good/items").json()["total"] == 2
        huge = httpx.get(run.url + "/api/traces/good/tokens?item=" + "9" * 30)
        assert huge.status_code == 400 and huge.json()["error"]["param"] == "item"


def test_a_store_of_another_model_is_marked(tmp_path):
    import json

    mine = write_store(tmp_path / "runs" / "mine")
    other = write_store(tmp_path / "runs" / "other")
    (mine / "trace.json").write_text(json.dumps({"model": "tiny-llama"}))
    (other / "trace.json").write_text(json.dumps({"model": "gemma-2-9b-it"}))
    stores = TraceStores([tmp_path / "runs"])
    (line,) = stores.check_model("tiny-llama")
    assert "other" in line and "gemma-2-9b-it" in line and "tiny-llama" in line
    listing = {s["name"]: s for s in stores.listing()}
    assert listing["other"]["model"] == "gemma-2-9b-it" and "model" not in listing["mine"]


def test_odd_query_values_are_openai_shaped_errors(llama_dir, tmp_path):
    from pertoken.backends import load_backend

    bk = load_backend(str(llama_dir), "torch", dtype="float32")
    with serving(bk, traces=TraceStores([write_store(tmp_path / "s")])) as run:
        for path in ("/api/traces/s/tokens", "/api/traces/s/items?offset=x"):
            r = httpx.get(run.url + path)
            assert r.status_code == 400 and r.json()["error"]["message"], path
        far = httpx.get(run.url + f"/api/traces/s/items?offset={10**30}&limit={-(10**30)}")
        assert far.status_code == 200 and far.json()["rows"] == []


def test_serve_says_which_stores_are_of_another_model(llama_dir, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from pertoken.cli import main
    from pertoken.serve import server

    other = write_store(tmp_path / "runs" / "other")
    (other / "trace.json").write_text(json.dumps({"model": "gemma-2-9b-it"}))
    monkeypatch.setattr(server, "serve_forever", lambda *a, **kw: None)
    args = ["serve", "--model", str(llama_dir), "--backend", "torch", "--traces", str(other)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    (line,) = [x for x in r.output.splitlines() if "gemma-2-9b-it" in x]
    assert line.startswith("warning: trace store other was traced with gemma-2-9b-it")
