"""`pertoken serve` refuses bad requests in OpenAI's error shape and stays up; keys, caps,
disconnects and the command itself."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
from click.testing import CliRunner

from pertoken.backends import load_backend
from pertoken.cli import main
from tests.serve_helpers import ask, client, serving, vector_files


@pytest.fixture(scope="module")
def backend(llama_dir):
    return load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def run(backend):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with serving(backend, max_body=8192) as r:
        yield r
    torch.set_num_threads(n)


def _post(run, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json"} | kw.pop("headers", {})
    return httpx.post(run.url + "/v1/chat/completions", content=data, headers=headers, **kw)


def _body(backend, **kw):
    return {"model": backend.model_id, "messages": ask("hi"), "max_tokens": 4, **kw}


def _steer(vector, layer):
    return {"steer": [{"vector": vector, "layer": layer, "coef": 1.0}]}


CASES = [
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "bad_json"),
    ("not an object", b"[1, 2]", 400, "bad_json"),
    ("unknown vector", _steer("evil", 2), 400, "unknown_vector"),
    ("layer too high", _steer("kind", 9), 400, "layer_out_of_range"),
    ("layer zero", _steer("kind", 0), 400, "layer_out_of_range"),
    ("max_tokens above cap", {"max_tokens": 65}, 400, "max_tokens_above_cap"),
    ("prompt too long", {"messages": ask("money " * 600)}, 400, "context_length_exceeded"),
    ("body over cap", {"messages": ask("x" * 9000)}, 413, "too_big"),
    ("unknown model", {"model": "gpt-4o"}, 404, "model_not_found"),
    ("too many top_logprobs", {"logprobs": True, "top_logprobs": 21}, 400, None),
    ("bad positions", {"positions": "middle"}, 400, None),
    ("bad role", {"messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ("bad temperature", {"temperature": "hot"}, 400, None),
    ("tools", {"tools": [{"type": "function"}]}, 400, None),
]  # fmt: skip


@pytest.mark.parametrize("name, change, status, code", CASES, ids=[c[0] for c in CASES])
def test_bad_request_has_its_status_and_the_server_stays_up(
    run, backend, name, change, status, code
):
    body = change if isinstance(change, bytes) else _body(backend, **change)
    r = _post(run, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code
    ok = _post(run, _body(backend))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_without_max_tokens_an_answer_gets_what_the_context_leaves(run, backend):
    # a prompt that leaves 10 of the tiny model's 512 positions: below the 64-token cap
    k = next(k for k in range(100, 600) if _tokens(backend, "money " * k) >= 502)
    messages = ask("money " * k)
    room = 512 - _tokens(backend, "money " * k)
    assert 0 < room < 64
    body = {"model": backend.model_id, "messages": messages, "temperature": 0}
    r = _post(run, body).json()
    assert "usage" in r, r
    assert r["usage"]["completion_tokens"] <= room
    with_cap = _post(run, body | {"max_tokens": 64})
    assert with_cap.json()["error"]["code"] == "context_length_exceeded"


def _tokens(backend, text: str) -> int:
    return len(backend.encode(backend.chat_prompt(None, text)))


def test_openai_client_reads_the_errors(run, backend):
    c = client(run)
    with pytest.raises(openai.BadRequestError, match="outside 1..4"):
        c.chat.completions.create(
            model=backend.model_id, messages=ask("hi"),
            extra_body={"steer": [{"vector": "kind", "layer": 7, "coef": 1.0}]},
        )  # fmt: skip
    with pytest.raises(openai.NotFoundError, match="serves"):
        c.chat.completions.create(model="nope", messages=ask("hi"))
    with pytest.raises(openai.BadRequestError, match="cap of 64"):
        c.chat.completions.create(model=backend.model_id, messages=ask("hi"), max_tokens=500)
    missing = httpx.get(run.url + "/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_monitor_needs_vectors(backend):
    with serving(backend, vectors={}, layers=[]) as r:
        resp = _post(r, _body(backend, monitor=True))
        assert resp.status_code == 400 and "--vector" in resp.json()["error"]["message"]


def test_api_key_is_required_when_set(backend):
    with serving(backend, api_key="s3cret-key") as r:
        assert _post(r, _body(backend)).status_code == 401
        wrong = _post(r, _body(backend), headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(r.url + "/api/info").status_code == 401
        good = client(r, key="s3cret-key").chat.completions.create(
            model=backend.model_id, messages=ask("hi"), max_tokens=3
        )
        assert good.choices[0].finish_reason in ("stop", "length")
        assert httpx.get(r.url + "/").status_code == 200  # the page holds no data


def test_other_hosts_need_a_key(llama_dir):
    r = CliRunner().invoke(main, ["serve", "--model", str(llama_dir), "--host", "0.0.0.0"])
    assert r.exit_code == 1
    assert "--api-key" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1


def test_a_client_that_disconnects_frees_its_slot(llama_dir):
    # A model that never ends on its own and a single slot: the second request can only run
    # once the first client's slots end.
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    bk.stop_ids = torch.tensor([-1])
    with serving(bk, max_slots=1, max_tokens=400) as r:
        c = client(r)
        stream = c.chat.completions.create(
            model=bk.model_id, messages=ask("hi"), max_tokens=400, stream=True
        )
        for _, _chunk in zip(range(3), stream):
            pass
        stream.close()
        t0 = time.monotonic()
        other = c.chat.completions.create(model=bk.model_id, messages=ask("hi"), max_tokens=4)
        assert other.usage.completion_tokens == 4
        assert time.monotonic() - t0 < 20
        assert r.engine.stats["tokens"] < 200  # the first answer stopped early
        assert r.engine.stats["batches"] == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_serve_command_serves_until_interrupted(llama_dir, tmp_path):
    files = vector_files(tmp_path)
    port = _free_port()
    exe = Path(sys.executable).with_name("pertoken")
    args = [str(exe), "serve", "--model", str(llama_dir), "--backend", "torch", "--port", str(port)]
    args += ["--vector", f"kind={files['kind']}", "--layers", "2,3", "--max-tokens", "32"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                card = httpx.get(url + "/v1/models").json()["data"][0]
                break
            except httpx.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert card["id"] == llama_dir.name and card["pertoken"]["layers"] == [2, 3]
        r = httpx.post(
            url + "/v1/chat/completions",
            json={"model": str(llama_dir), "messages": ask("hi"), "max_tokens": 5,
                  "monitor": True, "steer": [{"vector": "kind", "layer": 2, "coef": 3}]},
            timeout=60,
        )  # fmt: skip
        message = r.json()["choices"][0]["message"]
        assert len(message["pertoken"]["projections"][0]) == 1  # one vector
        assert len(message["pertoken"]["projections"][0][0]) == 2  # two rows
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, out
    assert f"{url}/v1" in out


# ---------------------------------------------------------------- no 500s, no tracebacks
DEEP = b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
MORE_CASES = [
    ("vector as a list", {"steer": [{"vector": ["kind"], "layer": 2, "coef": 1}]}, "steer"),
    ("vector as a dict", {"steer": [{"vector": {"a": 1}, "layer": 2, "coef": 1}]}, "steer"),
    ("seed -1", {"seed": -1}, "seed"),
    ("seed past int64", {"seed": 10**30}, "seed"),
]  # fmt: skip


@pytest.mark.parametrize("name, change, param", MORE_CASES, ids=[c[0] for c in MORE_CASES])
def test_odd_values_are_400s_on_a_connection_that_stays_open(run, backend, name, change, param):
    body = change if isinstance(change, bytes) else json.dumps(_body(backend, **change)).encode()
    with socket.create_connection(_address(run)) as s:
        status, reply = _exchange(s, "POST", "/v1/chat/completions", body)
        assert status == 400, reply
        error = json.loads(reply)["error"]
        assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
        if param:
            assert error["param"] == param
        ok = json.dumps(_body(backend)).encode()
        assert _exchange(s, "POST", "/v1/chat/completions", ok)[0] == 200  # same connection


def test_a_bug_is_a_json_500_and_the_connection_stays_open(backend, tmp_path, monkeypatch):
    from pertoken.serve.traces import TraceStores
    from tests.serve_helpers import write_store

    stores = TraceStores([write_store(tmp_path / "s")])
    monkeypatch.setattr(stores, "listing", lambda: 1 / 0)
    with serving(backend, traces=stores) as r, socket.create_connection(_address(r)) as s:
        status, reply = _exchange(s, "POST", "/v1/chat/completions", DEEP)  # 200 kB
        assert status == 400 and json.loads(reply)["error"]["code"] == "bad_json"
        status, reply = _exchange(s, "GET", "/api/traces")
        assert status == 500 and "Traceback" not in reply
        assert json.loads(reply)["error"]["type"] == "server_error"
        assert _exchange(s, "GET", "/v1/models")[0] == 200


def _strict(text: str):
    def refuse(name):
        raise AssertionError(f"{name} in the JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_numbers_never_reach_json(llama_dir):
    bk = load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    bk.model.model.norm.weight.data.fill_(float("nan"))  # the last row and the logits are NaN
    body = _body(bk, monitor=True, logprobs=True, top_logprobs=2, temperature=0)
    with serving(bk) as r:
        whole = _post(r, body)
        assert whole.status_code == 200, whole.text
        choice = _strict(whole.text)["choices"][0]
        projections = choice["message"]["pertoken"]["projections"]  # [token][vector][row]
        assert projections[0][0][1] is None and isinstance(projections[0][0][0], float)
        assert choice["logprobs"]["content"][0]["logprob"] == -9999.0
        streamed = _post(r, body | {"stream": True})
        events = [e[6:] for e in streamed.text.split("\n\n") if e.startswith("data: {")]
        assert len(events) > 3 and all(_strict(e) for e in events)


def _address(run) -> tuple[str, int]:
    host, port = run.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _exchange(s: socket.socket, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    """One HTTP/1.1 request on an open connection and its whole (Content-Length) reply."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
    s.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(s)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    fields = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert fields.get("connection") != "close", lines
    while len(rest) < int(fields["content-length"]):
        rest += _recv(s)
    return int(lines[0].split()[1]), rest.decode()


def _recv(s: socket.socket) -> bytes:
    s.settimeout(60)
    part = s.recv(65536)
    assert part, "the server closed the connection"
    return part


BAD_OPTIONS = [
    (["--max-batch", "0"], "--max-batch"),
    (["--max-body", "-1"], "--max-body"),
    (["--prompts-per-step", "0"], "--prompts-per-step"),
    (["--prefix-cache-mb", "-5"], "--prefix-cache-mb"),
    (["--prefix-cache-mb", "nan"], "--prefix-cache-mb"),
    (["--max-tokens", "0"], "--max-tokens"),
    (["--timeout", "0"], "--timeout"),
    (["--api-key", " ", "--host", "0.0.0.0"], "--api-key"),
    (["--api-key", ""], "--api-key"),
    (["--allow-origin", "evil.example"], "--allow-origin"),
]  # fmt: skip


@pytest.mark.parametrize("args, name", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_options_are_checked_at_start_up(args, name, tmp_path):
    # a model folder that does not exist: the options must be refused before it is looked at
    r = CliRunner().invoke(main, ["serve", "--model", str(tmp_path / "none"), *args])
    assert r.exit_code == 1, r.output
    assert r.output.count("\n") == 1 and name in r.output and "Traceback" not in r.output
