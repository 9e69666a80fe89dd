"""SIGTERM drains: in-flight streams finish, new requests are refused, the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow


def test_sigterm_drains_in_flight_stream():
    srv = ServerProcess(["--model", "default", "--drain-timeout", "60"])
    with srv:
        body = {"model": "default", "prompt": "Once upon a time", "max_tokens": 24,
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
        time.sleep(0.5)
        # no new work once draining: refused (503) or the listener is already closed
        try:
            r = httpx.post(srv.url + "/v1/completions", timeout=5,
                           json={"model": "default", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 503
        except httpx.ConnectError:
            pass
        t.join(120)
        assert chunks[-1] == "[DONE]"
        events = [json.loads(c) for c in chunks[:-1]]
        assert events[-1]["choices"][0]["finish_reason"] == "length"
        assert srv.proc.wait(60) == 0
