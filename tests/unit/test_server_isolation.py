"""The server's side of fault isolation, in process (no sockets): a dead engine thread turns
/health 503 at once and ends in-flight streams with an error event; a streaming client that
leaves while queued frees its slot at once; the drain state machine behind SIGTERM."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from corral import AsyncLLM
from corral.server.app import create_app
from corral.server.config import ServerConfig
from corral.server.limits import Admission


@pytest.fixture
def engine(tiny_model_dir):
    eng = AsyncLLM(model=str(tiny_model_dir), block_size=8, num_kv_blocks=64, max_model_len=256)
    yield eng
    eng.shutdown()


def client(app) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://corral")


def sse_events(text: str) -> list:
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


async def until(cond, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def test_dead_engine_thread_turns_health_503(engine, caplog):
    app = create_app(engine, ServerConfig(model_name="tiny"))
    real_step, calls = engine.core.step, [0]

    def step():  # an engine bug (not a request's fault) on the 4th step
        calls[0] += 1
        if calls[0] == 4:
            raise SystemError("injected engine bug")
        return real_step()

    async with client(app) as c:
        h = await c.get("/health")
        assert h.status_code == 200 and h.json()["status"] == "ok"
        engine.core.step = step  # the engine thread looks it up every turn
        body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 40, "ignore_eos": True,
                "stream": True}
        r = await c.post("/v1/completions", json=body)
        # the stream had begun: it ends with an error event, then [DONE]
        assert r.status_code == 200
        events = sse_events(r.text)
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
        assert err["code"] == "engine_dead" and "injected engine bug" in err["message"]
        assert any(json.loads(e).get("choices") for e in events[:-2])  # tokens came first

        h = await c.get("/health")
        assert h.status_code == 503 and h.headers["retry-after"]
        assert h.json()["status"] == "error" and "injected engine bug" in h.json()["error"]
        r = await c.post("/v1/completions", json={"model": "tiny", "prompt": [5, 6],
                                                   "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
    assert "engine thread died" in caplog.text and "injected engine bug" in caplog.text


class Call:
    """One HTTP request driven straight through the ASGI app, with a switch that makes the
    client disconnect (what uvicorn reports when the socket closes)."""

    def __init__(self, app, path: str, body: dict):
        self.messages: list[dict] = []
        self.gone = asyncio.Event()
        self._body = json.dumps(body).encode()
        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
                 "http_version": "1.1", "method": "POST", "scheme": "http", "path": path,
                 "raw_path": path.encode(), "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(self._body)).encode())],
                 "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
        self.task = asyncio.create_task(app(scope, self._receive, self._send))

    async def _receive(self):
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message):
        self.messages.append(message)

    @property
    def status(self) -> int | None:
        return next((m["status"] for m in self.messages if m["type"] == "http.response.start"),
                    None)

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages
                        if m["type"] == "http.response.body")


async def test_queued_streaming_client_that_leaves_frees_its_slot(engine):
    app = create_app(engine, ServerConfig(model_name="tiny", max_concurrent_requests=1,
                                          max_queue=1))
    adm = app.state.serving.admission
    start = engine.stats().num_free_blocks
    gate, real_step = threading.Event(), engine.core.step

    def step():  # a long engine step: nothing gets its first token until the gate opens
        gate.wait()
        return real_step()

    engine.core.step = step
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True,
            "stream": True}
    try:
        a = Call(app, "/v1/completions", body)  # admitted, waiting in the engine
        await until(lambda: adm.running == 1)
        b = Call(app, "/v1/completions", body)  # waiting for a slot
        await until(lambda: adm.queued == 1)
        c = Call(app, "/v1/completions", body)
        await asyncio.wait_for(c.task, 10)
        assert c.status == 429  # slot and queue full
        b.gone.set()  # leaves while queued: its place in the queue is free at once
        await asyncio.wait_for(b.task, 10)
        assert adm.queued == 0 and adm.running == 1
        d = Call(app, "/v1/completions", body)
        await until(lambda: adm.queued == 1)
        await asyncio.sleep(0.1)
        assert d.status is None  # queued, not refused
        a.gone.set()  # leaves while its request waits in the engine: d gets the slot at once
        await asyncio.wait_for(a.task, 10)
        assert adm.running == 1 and adm.queued == 0
        gate.set()
        await asyncio.wait_for(d.task, 30)
        assert d.status == 200 and sse_events(d.body.decode())[-1] == "[DONE]"
        assert adm.running == 0
        await until(lambda: engine.stats().num_free_blocks == start
                    and engine.stats().num_requests == 0)
    finally:
        gate.set()


class FakeEngine:
    def __init__(self):
        self.aborted: list[str] = []

    def abort_all(self, reason: str) -> int:
        self.aborted.append(reason)
        return 1


class FakeServing:
    def __init__(self):
        self.admission = Admission(max_running=1, max_queue=2)
        self.engine = FakeEngine()


async def test_drain_waits_then_fails_the_rest_then_exits():
    import uvicorn

    from corral.server import drain

    serving = FakeServing()
    srv = drain.DrainingServer(uvicorn.Config(app=None), serving, drain_timeout=0.3)
    adm = serving.admission
    await adm.acquire()  # one request running
    queued = asyncio.create_task(adm.acquire())
    await until(lambda: adm.queued == 1)
    assert not await srv.on_tick(1)  # no signal yet: serving
    srv.handle_exit(15, None)
    assert adm.draining and not srv.should_exit  # the listener stays open
    assert not await srv.on_tick(1)  # in-flight requests get their time
    await asyncio.sleep(0.35)
    assert not await srv.on_tick(1)  # timeout: the stragglers are failed ...
    assert serving.engine.aborted == [drain.SHUTDOWN_REASON]
    with pytest.raises(Exception) as e:
        await queued
    assert getattr(e.value, "status", None) == 503
    adm.release()  # ... their handlers end and give the slots back
    assert await srv.on_tick(1)  # idle: uvicorn may stop now


async def test_drain_exits_as_soon_as_idle_and_second_signal_skips_the_wait():
    import uvicorn

    from corral.server import drain

    serving = FakeServing()
    srv = drain.DrainingServer(uvicorn.Config(app=None), serving, drain_timeout=60)
    srv.handle_exit(15, None)
    assert await srv.on_tick(1)  # nothing in flight: exit at once
    assert serving.engine.aborted == []

    serving = FakeServing()
    srv = drain.DrainingServer(uvicorn.Config(app=None), serving, drain_timeout=60)
    await serving.admission.acquire()
    srv.handle_exit(15, None)
    assert not await srv.on_tick(1)
    srv.handle_exit(15, None)  # impatient operator
    assert not await srv.on_tick(1)
    assert serving.engine.aborted == [drain.SHUTDOWN_REASON]
