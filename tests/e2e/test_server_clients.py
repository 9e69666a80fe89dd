"""TGI's own clients against `corral serve`, unchanged: `huggingface_hub.InferenceClient`
(chat_completion sync / streamed / with stream_options, text_generation) and
`text_generation.Client` (chat, generate, generate_stream); plus the header read timeout that
closes half-open connections."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from corral.server.launch import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server():
    args = ["--model", "default", "--max-total-tokens", "128", "--header-timeout", "1",
            "--keep-alive-timeout", "1"]
    with ServerProcess(args) as srv:
        yield srv


def greedy_chat(server, max_tokens: int) -> str:
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "model": "default", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0})
    return r.json()["choices"][0]["message"]["content"]


def test_inference_client_chat_completion(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    expected = greedy_chat(server, 8)
    out = client.chat_completion(QUESTION, max_tokens=8, temperature=0)
    assert out.choices[0].message.content == expected
    assert out.usage.completion_tokens <= 8
    chunks = list(client.chat_completion(QUESTION, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    # the OpenAI-style `client.chat.completions.create` spelling, streamed without usage
    stream = client.chat.completions.create(messages=QUESTION, max_tokens=8, temperature=0,
                                            stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_inference_client_text_generation(server):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=server.url)
    prompt = "The capital of France is"
    ref = httpx.post(server.url + "/generate", timeout=60, json={
        "inputs": prompt, "parameters": {"max_new_tokens": 5}}).json()["generated_text"]
    assert client.text_generation(prompt, max_new_tokens=5) == ref
    d = client.text_generation(prompt, max_new_tokens=5, details=True)
    assert d.generated_text == ref and d.details.generated_tokens == len(d.details.tokens)
    assert "".join(client.text_generation(prompt, max_new_tokens=5, stream=True)) == ref


def test_text_generation_client(server):
    from text_generation import Client
    from text_generation.types import Message

    client = Client(server.url, timeout=60)
    expected = greedy_chat(server, 8)
    # sends model="tgi" and n=null; greedy through TGI's semantics (temperature 0 not allowed)
    out = client.chat([Message(role="user", content=QUESTION[0]["content"])], max_tokens=8,
                      temperature=None, top_p=None, seed=1)
    assert out.choices[0].message.content and out.choices[0].finish_reason in ("stop", "length")
    # Its stream parser parses every chunk (each delta has the role and tool_calls it
    # requires) but not OpenAI's closing `data: [DONE]`, which corral sends like OpenAI/vLLM.
    chunks = []
    stream = client.chat([Message(role="user", content=QUESTION[0]["content"])],
                         max_tokens=8, seed=1, stream=True)
    with pytest.raises(json.JSONDecodeError):
        chunks.extend(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == \
        out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    r = client.generate("The capital of France is", max_new_tokens=5)
    assert r.generated_text and r.details.generated_tokens <= 5
    streamed = "".join(t.token.text for t in client.generate_stream(
        "The capital of France is", max_new_tokens=5))
    assert streamed == r.generated_text
    assert expected  # the same server answered the plain request too


def test_half_open_connections_are_closed(server):
    """50 connections that never finish their headers are closed after --header-timeout 1."""
    socks = []
    for i in range(50):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never end
        socks.append(s)
    t = time.monotonic()
    closed = 0
    for s in socks:
        try:
            closed += s.recv(1024) == b""  # EOF: the server closed it
        except OSError:
            closed += 1
        finally:
            s.close()
    assert closed == 50 and time.monotonic() - t < 8
    # and an idle keep-alive connection is closed after --keep-alive-timeout
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(4096)
    assert data.startswith(b"HTTP/1.1 200")
    t = time.monotonic()
    while s.recv(4096):
        pass
    assert time.monotonic() - t < 5
    s.close()
    assert httpx.get(server.url + "/health").status_code == 200
