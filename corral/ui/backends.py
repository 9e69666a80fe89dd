"""Where the UI's answers come from: the local engine or any OpenAI-compatible endpoint.

Both backends speak one small protocol, so the Gradio app never knows which one it has:

    backend.stream_chat(messages, params)  -> async iterator of text deltas
    backend.info()                          -> dict(name, params, dtype, max_model_len, ...)

Failures a user can act on (endpoint down, prompt too long) raise CorralError with one line;
the app shows that line in the chat. Leaving the iterator early (stop button, closed tab)
aborts the request on the engine or closes the HTTP stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import httpx

from corral.errors import CorralError
from corral.sampling_params import SamplingParams

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


class ChatBackend(Protocol):
    def stream_chat(self, messages: list[Message], params: SamplingParams) -> AsyncIterator[str]:
        """Yield the answer to `messages` as text deltas."""
        ...

    def info(self) -> dict[str, Any]:
        """Model facts for the page header: name, params, dtype, max_model_len (any may miss)."""
        ...


class LocalBackend:
    """Chat with an in-process `AsyncLLM` (the engine runs its loop in a thread)."""

    def __init__(self, engine: Any):
        self.engine = engine
        self._info: dict[str, Any] | None = None

    @classmethod
    def load(cls, model: str, **engine_kwargs: Any) -> LocalBackend:
        """Start an AsyncLLM on `model` (an alias, folder, .gguf or hub id)."""
        from corral import AsyncLLM

        return cls(AsyncLLM(model=model, **engine_kwargs))

    def info(self) -> dict[str, Any]:
        if self._info is None:
            from corral.models import resolve_alias

            info = dict(self.engine.info)
            # "default" says little on the page: name the file the alias stands for too.
            target = resolve_alias(str(info.get("name") or ""))
            if target:
                info["name"] = f"{Path(target).stem} ({info['name']})"
            self._info = info
        return self._info

    def stats(self) -> dict[str, Any]:
        """Engine load, for the /corral/status route (the browser test checks it goes idle)."""
        s = self.engine.stats()
        return {"num_running": s.num_running, "num_waiting": s.num_waiting,
                "num_free_blocks": s.num_free_blocks, "num_total_blocks": s.num_total_blocks}

    async def stream_chat(
        self, messages: list[Message], params: SamplingParams
    ) -> AsyncIterator[str]:
        ids = self.engine.encode_chat(messages)
        limit = self.engine.max_model_len
        if len(ids) >= limit:
            raise CorralError(
                f"The conversation is {len(ids)} tokens; this model's context is {limit} tokens. "
                "Clear the chat or shorten the message."
            )
        # Leave room for the prompt: never ask for more new tokens than the context holds.
        max_new = limit - len(ids)
        if params.max_tokens is None or params.max_tokens > max_new:
            params = _replace(params, max_tokens=max_new)
        # The chat format's end-of-turn tokens and stop strings end the answer.
        if hasattr(self.engine, "chat_params"):
            params = self.engine.chat_params(params)
        stream = self.engine.stream(ids, params)
        try:
            async for out in stream:
                if getattr(out, "error", None):
                    raise CorralError(f"The engine failed: {out.error}")
                delta = out.outputs[0].delta_text
                if delta:
                    yield delta
        finally:
            # Closing the engine's generator aborts the request and frees its KV blocks, even
            # when we are being cancelled (stop button) rather than finishing normally.
            await stream.aclose()


class EndpointBackend:
    """Chat with an OpenAI-compatible server (`corral serve`, vLLM, TGI's Messages API...)."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.base_url = self.url if self.url.endswith("/v1") else self.url + "/v1"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self._info: dict[str, Any] | None = None

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def info(self) -> dict[str, Any]:
        """Ask GET /v1/models once it answers; until then name what we know."""
        if self._info is not None:
            return self._info
        fallback = {"name": self.model or "unknown model", "endpoint": self.url}
        try:
            r = httpx.get(self.base_url + "/models", headers=self._headers(), timeout=3.0)
            r.raise_for_status()
            models = r.json().get("data") or []
        except (httpx.HTTPError, ValueError):
            return fallback
        entry = next((m for m in models if m.get("id") == self.model), models[0] if models else {})
        if self.model is None:
            self.model = entry.get("id")
        self._info = {
            "name": entry.get("id") or fallback["name"],
            "endpoint": self.url,
            "params": entry.get("params"),
            "dtype": entry.get("dtype"),
            "max_model_len": entry.get("max_model_len") or entry.get("context_length"),
        }
        return self._info

    async def stream_chat(
        self, messages: list[Message], params: SamplingParams
    ) -> AsyncIterator[str]:
        import openai

        if self.model is None:
            self.info()
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none",
                                    max_retries=0, timeout=self.timeout)
        try:
            stream = await client.chat.completions.create(
                model=self.model or "default",
                messages=messages,
                stream=True,
                temperature=params.temperature,
                top_p=params.top_p,
                max_tokens=params.max_tokens,
                # vLLM's extensions, which `corral serve` accepts too.
                extra_body={"top_k": params.top_k,
                            "repetition_penalty": params.repetition_penalty},
            )
            try:
                async for chunk in stream:
                    delta = chunk.choices[0].delta.content if chunk.choices else None
                    if delta:
                        yield delta
            finally:
                # Closing the response makes the server abort the request (stop button).
                await stream.close()
        except openai.APIConnectionError as e:
            raise CorralError(f"Cannot reach {self.url}: {_reason(e)}") from None
        except openai.APIStatusError as e:
            raise CorralError(f"{self.url} answered {e.status_code}: {_detail(e)}") from None
        finally:
            await client.close()


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)


def _reason(e: Exception) -> str:
    """The innermost cause of a connection failure, e.g. 'connection refused'."""
    chain: list[BaseException] = [e]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) and len(chain) < 20:
        chain.append(nxt)
    if any(isinstance(c, ConnectionRefusedError) or "refused" in str(c).lower() for c in chain):
        return "connection refused"
    if any(isinstance(c, httpx.TimeoutException | TimeoutError) for c in chain):
        return "timed out"
    text = str(chain[-1]) or type(chain[-1]).__name__
    return text.splitlines()[0]


def _detail(e: Any) -> str:
    """The server's error message from an OpenAI-style {"error": {"message": ...}} body."""
    body = getattr(e, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(body.get("detail"), str):
            return body["detail"]
    return str(getattr(e, "message", e)).splitlines()[0]
