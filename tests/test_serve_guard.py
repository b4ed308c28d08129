"""A keyless server answers only its own loopback names, JSON bodies and its own (or named)
origins, so that another web page cannot use it through the browser (cross-origin form posts,
DNS rebinding); with a key, the key guards it."""

import httpx
import pytest

from pertoken.backends import load_backend
from tests.serve_helpers import ask, serving


@pytest.fixture(scope="module")
def backend(llama_dir):
    return load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def run(backend):
    with serving(backend, allow_origins=["http://app.example:3000"]) as r:
        yield r


def _chat(run, backend, headers: dict, json_type=True):
    import json

    body = json.dumps({"model": backend.model_id, "messages": ask("hi"), "max_tokens": 2})
    sent = ({"Content-Type": "application/json"} if json_type else {}) | headers
    return httpx.post(run.url + "/v1/chat/completions", content=body, headers=sent, timeout=60)


def _port(run) -> str:
    return run.url.rsplit(":", 1)[1]


REFUSED = [
    ("form post", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    ("no content type", None, 415, "unsupported_media_type"),
    ("foreign origin", {"Origin": "http://attacker.example"}, 403, "forbidden_origin"),
    ("null origin", {"Origin": "null"}, 403, "forbidden_origin"),
    ("rebound host", {"Host": "attacker.example"}, 403, "forbidden_host"),
    ("rebound host with port", {"Host": "attacker.example:8000"}, 403, "forbidden_host"),
]  # fmt: skip


@pytest.mark.parametrize("name, headers, status, code", REFUSED, ids=[c[0] for c in REFUSED])
def test_a_keyless_server_refuses_what_a_foreign_page_can_send(
    run, backend, name, headers, status, code
):
    r = _chat(run, backend, headers or {}, json_type=headers is not None)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and "\n" not in r.json()["error"]["message"]
    assert r.json()["error"]["message"]
    assert run.engine.stats["batches"] == 0  # nothing was generated


def test_reads_need_a_loopback_host_too(run):
    for path in ("/v1/models", "/api/info", "/"):
        r = httpx.get(run.url + path, headers={"Host": "attacker.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", path


def test_its_own_names_and_origins_are_served(run, backend):
    port = _port(run)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", "127.0.0.2"):
        assert httpx.get(run.url + "/v1/models", headers={"Host": host}).status_code == 200
    same = _chat(run, backend, {"Origin": run.url})  # the lab page
    assert same.status_code == 200
    named = _chat(run, backend, {"Origin": "http://app.example:3000"})
    assert named.status_code == 200
    assert named.headers["access-control-allow-origin"] == "http://app.example:3000"
    preflight = httpx.options(
        run.url + "/v1/chat/completions",
        headers={
            "Origin": "http://app.example:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 200
    typed = _chat(run, backend, {"Content-Type": "application/json; charset=utf-8"})
    assert typed.status_code == 200


def test_with_a_key_the_key_guards_any_host(backend):
    with serving(backend, api_key="k3y") as r:
        headers = {"Host": "my-workstation.lan:8000", "Authorization": "Bearer k3y"}
        assert _chat(r, backend, headers).status_code == 200
        assert _chat(r, backend, {"Host": "my-workstation.lan"}).status_code == 401
