"""The server's worker keeps going whatever its slot loop does: identical-looking requests
decode together, a failing step fails its own requests with a 500, a request that waits too
long fails with a timeout; every later request is served. Checked through HTTP."""

import threading

import httpx
import pytest

from pertoken.backends import load_backend
from tests.serve_helpers import arriving_together, ask, serving


@pytest.fixture(scope="module")
def backend(llama_dir):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_backend(str(llama_dir), "torch", dtype="float32", device="cpu")
    torch.set_num_threads(n)


def _post(run, body, timeout=60):
    return httpx.post(run.url + "/v1/chat/completions", json=body, timeout=timeout)


def _body(backend, **kw):
    return {"model": backend.model_id, "messages": ask("hi"), "max_tokens": 3, **kw}


def _together(run, bodies) -> list:
    """The responses to `bodies` posted at once (None where a request got no answer)."""
    out = [None] * len(bodies)

    def one(i):
        try:
            out[i] = _post(run, bodies[i], timeout=30)
        except httpx.TimeoutException:
            pass

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(bodies))]
    [t.start() for t in threads]
    [t.join(60) for t in threads]
    return out


def test_same_messages_with_different_coefficients_share_the_loop(backend):
    steer = lambda c: [{"vector": "kind", "layer": 2, "coef": c}]  # noqa: E731
    bodies = [_body(backend, temperature=0, steer=steer(c)) for c in (1.0, 2.0)]
    with serving(backend) as run:
        with arriving_together(run.engine, 2) as loop:
            got = _together(run, bodies)
        assert [r is not None and r.status_code for r in got] == [200, 200]
        assert loop["peak"] == 2 and run.engine.stats["rows"] == 2
        assert _post(run, _body(backend)).status_code == 200  # and the worker is still there


def _patched_loop(monkeypatch, backend, step):
    """The backend's slot loops run `step(real_step)` in place of each step."""
    real = type(backend)._slots

    def slots(self, *a, **kw):
        loop = real(self, *a, **kw)
        loop.step = (lambda s: lambda: step(s))(loop.step)
        return loop

    monkeypatch.setattr(backend, "_slots", slots.__get__(backend))


def test_a_failing_step_fails_its_requests_and_the_server_goes_on(backend, monkeypatch):
    calls = []

    def flaky(real):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the device\nfell over")
        return real()

    _patched_loop(monkeypatch, backend, flaky)
    with serving(backend) as run:
        r = _post(run, _body(backend))
        assert r.status_code == 500
        error = r.json()["error"]
        assert error["type"] == "server_error" and "fell over" in error["message"]
        assert "\n" not in error["message"]
        assert _post(run, _body(backend)).status_code == 200


def test_a_request_that_waits_too_long_fails_with_a_timeout(backend, monkeypatch):
    entered, gate = threading.Event(), threading.Event()

    def stuck(real):
        entered.set()
        gate.wait(30)
        return real()

    _patched_loop(monkeypatch, backend, stuck)
    with serving(backend, timeout=0.5) as run:
        out = []
        first = threading.Thread(target=lambda: out.append(_post(run, _body(backend))))
        first.start()
        try:
            assert entered.wait(30)  # the first request's step is stuck
            queued = _post(run, _body(backend, stream=True), timeout=30)
        finally:
            gate.set()
            first.join(60)
        # the running request gets no token in time; the queued stream fails before its
        # first chunk (an error status, not a broken stream)
        for r in (out[0], queued):
            assert r.status_code == 503 and r.json()["error"]["code"] == "timeout"
            assert "--timeout" in r.json()["error"]["message"]
        assert _post(run, _body(backend)).status_code == 200
