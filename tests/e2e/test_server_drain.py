"""SIGTERM drains: in-flight streams finish (or end with an error once the drain times out),
/health and new requests get 503 meanwhile, and the process exits 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import httpx
import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow


def test_sigterm_drains_in_flight_stream():
    srv = ServerProcess(["--model", "default", "--drain-timeout", "60"])
    with srv:
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 48,
                "ignore_eos": True, "stream": True}
        started, chunks = threading.Event(), []

        def client():
            with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                              timeout=120) as resp:
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        chunks.append(line[5:].strip())
                        started.set()

        t = threading.Thread(target=client)
        t.start()
        assert started.wait(60)
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        # no new work once draining, but the listener stays open to say so
        r = httpx.post(srv.url + "/v1/completions", timeout=5,
                       json={"model": "default", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers.get("retry-after")
        h = httpx.get(srv.url + "/health", timeout=5)
        assert h.status_code == 503 and h.json()["status"] == "draining"
        t.join(120)
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0


def test_sigterm_during_a_long_step_with_a_short_drain_exits_cleanly():
    """SIGTERM while the engine is inside a long prefill step, with a drain shorter than the
    request: /health says draining (503) and new requests get 503 meanwhile, the in-flight
    client gets a proper error (not a cut connection), and the process exits 0 (it used to die
    by SIGABRT: the interpreter exited while the engine thread was still in a torch kernel)."""
    srv = ServerProcess(["--model", "default", "--drain-timeout", "1"])
    with srv:
        # ~3000 prompt tokens: prefill takes several 1024-token steps of about a second each
        body = {"model": "default", "prompt": "the quick brown fox jumps " * 600,
                "max_tokens": 64, "ignore_eos": True, "stream": True}
        result: dict = {}

        def client():
            with httpx.stream("POST", srv.url + "/v1/completions", json=body,
                              timeout=120) as resp:
                result["status"] = resp.status_code
                result["body"] = resp.read().decode()

        t = threading.Thread(target=client)
        t.start()
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health", timeout=5).json()["running_requests"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.3)  # inside the first prefill step
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        h = httpx.get(srv.url + "/health", timeout=5)  # the listener is still open
        assert h.status_code == 503 and h.json()["status"] == "draining"
        r = httpx.post(srv.url + "/v1/completions", timeout=5,
                       json={"model": "default", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers.get("retry-after")
        assert r.json()["error"]["code"] == "shutting_down"
        t.join(120)
        assert not t.is_alive()
        code = srv.proc.wait(120)
        out = srv.output()
        assert code == 0, out[-3000:]
        assert "terminate called" not in out
        if result["status"] == 200:  # the stream had begun: it ends with an error event
            events = [line[5:].strip() for line in result["body"].splitlines()
                      if line.startswith("data:")]
            assert events[-1] == "[DONE]"
            assert json.loads(events[-2])["error"]["code"] == "shutting_down"
        else:  # still in prefill when the drain ran out: a JSON 503
            assert result["status"] == 503, result
            assert json.loads(result["body"])["error"]["code"] == "shutting_down"


def _open_stream(port: int, body: dict) -> socket.socket:
    """Send a streaming request on a raw socket (closing it is a client that goes away)."""
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: corral\r\nContent-Type: application/json"
              b"\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))
    return s


def _wait_health(srv, cond, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        h = httpx.get(srv.url + "/health", timeout=5).json()
        if cond(h):
            return h
        assert time.monotonic() < deadline, h
        time.sleep(0.05)


def test_queued_streaming_client_that_disconnects_frees_its_slot():
    """Over real sockets: one slot, one queue place. A client queued behind a long request
    closes its connection; its queue place is free at once, so the next client is queued
    instead of refused with 429."""
    srv = ServerProcess(["--model", "default", "--max-concurrent-requests", "1",
                         "--max-queue", "1"])
    with srv:
        long = {"model": "default", "prompt": "the quick brown fox jumps " * 600,
                "max_tokens": 200, "ignore_eos": True, "stream": True}
        short = {"model": "default", "prompt": "hi", "max_tokens": 2, "stream": True}
        a = _open_stream(srv.port, long)
        _wait_health(srv, lambda h: h["running_requests"] == 1)
        b = _open_stream(srv.port, short)
        _wait_health(srv, lambda h: h["queued_requests"] == 1)
        r = httpx.post(srv.url + "/v1/completions", json=short, timeout=10)
        assert r.status_code == 429 and r.headers.get("retry-after")
        b.close()
        h = _wait_health(srv, lambda h: h["queued_requests"] == 0, timeout=5)
        assert h["running_requests"] == 1  # the long request still runs
        c = _open_stream(srv.port, short)
        h = _wait_health(srv, lambda h: h["queued_requests"] == 1, timeout=5)
        assert h["running_requests"] == 1  # c waits for the slot: queued, not refused
        a.close()
        c.close()
        _wait_health(srv, lambda h: h["running_requests"] == 0 and h["queued_requests"] == 0
                     and h["num_free_blocks"] == h["num_total_blocks"])
