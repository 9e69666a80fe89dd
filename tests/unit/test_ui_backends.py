"""The UI's backends: the OpenAI-endpoint client against a small fake SSE server, and the
local backend's prompt-length check and abort-on-close against a stand-in engine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from corral.errors import CorralError
from corral.sampling_params import SamplingParams
from corral.ui.backends import EndpointBackend, LocalBackend


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_openai_app(seen: dict) -> FastAPI:
    """An OpenAI-compatible server: echoes the last user message word by word; a user message
    'forever' streams until the client goes away; 'too long' answers 400 like a real server."""
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-llama", "object": "model",
                                            "max_model_len": 4096}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        seen["body"] = body
        seen["auth"] = request.headers.get("authorization")
        last = body["messages"][-1]["content"]
        if last == "too long":
            return JSONResponse(status_code=400, content={"error": {
                "message": "prompt is 9000 tokens, the context is 4096", "type": "invalid"}})

        def chunk(text: str) -> str:
            data = {"id": "c1", "object": "chat.completion.chunk", "created": 0,
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if last == "forever":
                    while True:
                        seen["sent"] = seen.get("sent", 0) + 1
                        yield chunk("x")
                        await asyncio.sleep(0.02)
                for word in last.split():
                    yield chunk(word + " ")
                yield "data: [DONE]\n\n"
            finally:
                seen["closed"] = True

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_server():
    seen: dict = {}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake_openai_app(seen), host="127.0.0.1", port=port,
                                          log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "fake server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", seen
    server.should_exit = True
    thread.join(timeout=10)


async def collect(it) -> list[str]:
    return [d async for d in it]


async def test_endpoint_streams_deltas_and_sends_params(fake_server):
    url, seen = fake_server
    backend = EndpointBackend(url, api_key="sekret")
    params = SamplingParams(temperature=0.3, top_p=0.8, top_k=7, max_tokens=33,
                            repetition_penalty=1.2)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"}]
    deltas = await collect(backend.stream_chat(msgs, params))
    assert deltas == ["one ", "two ", "three "]
    body = seen["body"]
    assert body["model"] == "fake-llama"  # taken from /v1/models
    assert body["messages"] == msgs and body["stream"] is True
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.3, 0.8, 33)
    assert (body["top_k"], body["repetition_penalty"]) == (7, 1.2)
    assert seen["auth"] == "Bearer sekret"


def test_endpoint_info_reads_models(fake_server):
    url, _ = fake_server
    info = EndpointBackend(url + "/v1/").info()
    assert info["name"] == "fake-llama" and info["max_model_len"] == 4096
    assert info["endpoint"] == url + "/v1"


async def test_endpoint_error_status_is_one_readable_line(fake_server):
    url, _ = fake_server
    backend = EndpointBackend(url, model="fake-llama")
    with pytest.raises(CorralError, match="answered 400: prompt is 9000 tokens"):
        await collect(backend.stream_chat([{"role": "user", "content": "too long"}],
                                          SamplingParams()))


async def test_endpoint_down_says_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    backend = EndpointBackend(url, model="m")
    assert backend.info()["name"] == "m"  # the header still renders
    with pytest.raises(CorralError) as e:
        await collect(backend.stream_chat([{"role": "user", "content": "hi"}], SamplingParams()))
    assert str(e.value) == f"Cannot reach {url}: connection refused"


async def test_endpoint_closing_early_closes_the_server_stream(fake_server):
    url, seen = fake_server
    seen.pop("closed", None)
    seen["sent"] = 0
    it = EndpointBackend(url, model="fake-llama").stream_chat(
        [{"role": "user", "content": "forever"}], SamplingParams(max_tokens=None))
    got = [await anext(it) for _ in range(3)]
    assert got == ["x", "x", "x"]
    await it.aclose()  # what the stop button does to the chat generator
    deadline = time.time() + 5
    while not seen.get("closed"):
        assert time.time() < deadline, "server kept streaming after the client left"
        await asyncio.sleep(0.05)
    sent = seen["sent"]
    await asyncio.sleep(0.2)
    assert seen["sent"] == sent


class StandInEngine:
    """Just the AsyncLLM surface LocalBackend uses; records aborts."""

    max_model_len = 32

    def __init__(self):
        self.info = {"name": "stand-in", "params": 1000, "dtype": "float32", "max_model_len": 32}
        self.aborted = 0
        self.params: SamplingParams | None = None

    def encode_chat(self, messages):
        return [1] * sum(len(m["content"].split()) for m in messages)

    async def stream(self, prompt, params, request_id=None):
        from types import SimpleNamespace as NS

        self.params = params
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(0)
                yield NS(error=None, outputs=[NS(delta_text=f"t{i} ")])
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted += 1
            raise


async def test_local_caps_max_tokens_to_context():
    engine = StandInEngine()
    backend = LocalBackend(engine)
    msgs = [{"role": "user", "content": "a b c d"}]
    deltas = await collect(backend.stream_chat(msgs, SamplingParams(max_tokens=1000)))
    assert len(deltas) == 28 and engine.params.max_tokens == 28
    assert backend.info()["name"] == "stand-in"


async def test_local_too_long_prompt_is_readable():
    backend = LocalBackend(StandInEngine())
    msgs = [{"role": "user", "content": "w " * 40}]
    with pytest.raises(CorralError, match="conversation is 40 tokens; this model's context is 32"):
        await collect(backend.stream_chat(msgs, SamplingParams()))


async def test_local_closing_early_aborts_the_engine_request():
    engine = StandInEngine()
    it = LocalBackend(engine).stream_chat([{"role": "user", "content": "hi"}],
                                          SamplingParams(max_tokens=20))
    assert await anext(it) == "t0 "
    await it.aclose()
    assert engine.aborted == 1
