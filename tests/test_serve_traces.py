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
