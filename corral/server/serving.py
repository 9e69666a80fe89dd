"""What every route shares: prompt checks, admission, and one engine stream with its metrics.

The routes only translate protocols; this is the single path from an HTTP request to
`AsyncLLM.stream`, so limits, aborts and token accounting behave the same on every route.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from starlette.requests import Request

from corral.engine.llm import EngineDeadError, EngineShutdownError
from corral.errors import CorralError
from corral.outputs import RequestOutput
from corral.sampling_params import SamplingParams
from corral.server.config import ServerConfig
from corral.server.errors import ApiError
from corral.server.limits import Admission
from corral.server.metrics import ServerMetrics
from corral.server.tokens import is_byte_level, token_bytes

# `model` values TGI's clients send when they talk to one server by URL
PLACEHOLDER_MODELS = frozenset({"", "tgi", "dummy"})


@dataclass
class RequestRecord:
    """What the per-request log line reports; routes fill the token counts."""

    id: str
    method: str
    path: str
    start: float = field(default_factory=time.perf_counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    prompt: str | None = None


def new_id(prefix: str = "") -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass
class Serving:
    """The engine plus the server's limits, admission queue and metrics."""

    engine: object  # corral.AsyncLLM (or anything with its contract)
    config: ServerConfig
    metrics: ServerMetrics
    admission: Admission
    started: float = field(default_factory=time.time)
    _token_texts: dict[int, str] = field(default_factory=dict)
    _vocab: int | None = None
    _byte_level: bool | None = None

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def model_names(self) -> list[str]:
        names = [self.config.model_name, str(self.engine.info.get("name", ""))]
        return list(dict.fromkeys(n for n in names if n))

    def check_model(self, model: str | None) -> tuple[str, str | None]:
        """(the served name to report, the LoRA adapter it names or None for the base) for a
        request's `model`, or a 404.

        Like TGI (which serves whatever model it has), a placeholder that TGI's clients send
        ("tgi", "dummy", empty) is accepted as the one served model; `--strict-model-names`
        accepts only the served names (vLLM-style).
        """
        names = self.model_names
        if model in names:
            return model, None
        if model in self.lora_names:
            return model, model
        if not self.config.strict_model_names and \
                (model or "").strip().lower() in PLACEHOLDER_MODELS:
            return names[0], None
        served = names + self.lora_names
        raise ApiError(404, f"the model `{model}` does not exist; this server serves "
                            f"{', '.join(served)}", param="model", code="model_not_found")

    @property
    def vocab_size(self) -> int:
        """Token ids a request may name: in the model's embedding and the tokenizer."""
        if self._vocab is None:
            sizes = [len(self.tokenizer), self.engine.info.get("vocab_size")]
            self._vocab = min(int(v) for v in sizes if v)
        return self._vocab

    def token_bytes(self, token_id: int) -> list[int]:
        """One token's real bytes (logprobs' `bytes`; see corral.server.tokens)."""
        if self._byte_level is None:
            self._byte_level = is_byte_level(self.tokenizer)
        return token_bytes(self.tokenizer, token_id, self.token_text(token_id),
                           self._byte_level)

    @property
    def lora_names(self) -> list[str]:
        names = getattr(self.engine, "lora_names", None)
        return names() if names is not None else []

    def check_lora(self, name: str | None) -> str | None:
        """A TGI request's `lora` parameter: a loaded adapter or 404 (None/"": the base)."""
        if not name or name in self.model_names:
            return None
        if name not in self.lora_names:
            raise ApiError(404, f"LoRA adapter `{name}` is not loaded; loaded: "
                                f"{', '.join(self.lora_names) or 'none'}", param="lora",
                           code="model_not_found")
        return name

    def token_text(self, token_id: int) -> str:
        """One token's text (cached; used for logprobs)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def encode(self, prompt: str) -> list[int]:
        """Token ids for a plain-text prompt (the tokenizer's own special tokens, like HF)."""
        return list(self.tokenizer(prompt)["input_ids"])

    def budget(self, n_prompt: int, max_tokens: int | None, param: str = "max_tokens") -> int:
        """Check the prompt length and return the max_tokens to use (None: all that fits,
        never more than --max-total-tokens). `param` names the field in a 400."""
        cfg = self.config
        if n_prompt == 0:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if n_prompt > cfg.max_input_tokens:
            raise ApiError(413, f"the prompt has {n_prompt} tokens; the limit is "
                                f"{cfg.max_input_tokens}", param="prompt",
                           code="context_length_exceeded")
        room = cfg.max_total_tokens - n_prompt
        if max_tokens is None:
            return room
        if max_tokens < 1:
            raise ApiError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
        if max_tokens > room:
            raise ApiError(400, f"prompt ({n_prompt} tokens) + {param} ({max_tokens}) "
                                f"exceeds the limit of {cfg.max_total_tokens} tokens",
                           param=param, code="context_length_exceeded")
        return max_tokens

    async def run(self, record: RequestRecord,
                  jobs: list[tuple[list[int], SamplingParams, str]], lora: str | None = None
                  ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Stream (job index, update) for each (prompt ids, params, request id) job.

        Takes one admission slot for the whole HTTP request; raises ApiError(429/503) at the
        first step when admission refuses. Leaving early (client gone, error) aborts the
        engine requests, so their KV blocks are freed.
        """
        await self.admission.acquire()
        try:
            if len(jobs) == 1:
                async for out in self._one(record, *jobs[0], lora=lora):
                    yield 0, out
            else:
                async for item in merge([self._one(record, *j, lora=lora) for j in jobs]):
                    yield item
        finally:
            self.admission.release()

    async def _one(self, record: RequestRecord, prompt_ids: list[int], params: SamplingParams,
                   request_id: str, lora: str | None = None) -> AsyncIterator[RequestOutput]:
        m = self.metrics
        m.prompt_tokens.inc(len(prompt_ids))
        record.prompt_tokens += len(prompt_ids)
        kw = {"lora": lora} if lora is not None else {}  # engines without LoRA keep working
        source = self.engine.stream(prompt_ids, params, request_id=request_id, **kw)
        finished, last = False, None
        seen = [0] * params.n
        try:
            async for out in _user_errors(source):
                now = time.perf_counter()
                new = 0
                for c in out.outputs:  # num_tokens: the count, without copying token_ids
                    new += c.num_tokens - seen[c.index]
                    seen[c.index] = c.num_tokens
                if new:
                    m.generation_tokens.inc(new)
                    record.completion_tokens += new
                    if last is None:
                        record.ttft = record.ttft or now - record.start
                        m.ttft.observe(now - record.start)
                    else:
                        for _ in range(new):
                            m.itl.observe((now - last) / new)
                    last = now
                finished = out.finished
                if out.error and finished:
                    # the engine failed this request alone: an error response, or an error
                    # event if the stream has begun; a client error when its own values
                    # (a constraint no token can follow, ...) are the cause
                    raise ApiError(400 if out.error_by_request else 500,
                                   f"generation failed: {out.error}", code="generation_failed")
                yield out
        finally:
            if not finished:
                # Shielded: this also runs when the client's disconnect cancelled us, and the
                # blocks must be freed either way.
                await asyncio.shield(asyncio.ensure_future(self._abort(source, request_id)))

    async def _abort(self, source, request_id: str) -> None:
        try:
            await self.engine.abort(request_id)
        finally:
            await source.aclose()


async def _user_errors(source: AsyncIterator) -> AsyncIterator:
    """The engine refuses impossible requests with ValueError/CorralError: a 400. A stopped
    or dead engine is a 503 (the server is going away or must be restarted)."""
    while True:
        try:
            item = await source.__anext__()
        except StopAsyncIteration:
            return
        except (ValueError, CorralError) as e:
            raise ApiError(400, str(e), param=getattr(e, "param", None)) from None
        except EngineShutdownError as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        except EngineDeadError as e:
            raise ApiError(503, str(e), code="engine_dead") from None
        yield item


async def merge(gens: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators as (index, item), as items arrive."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, gen: AsyncIterator) -> None:
        try:
            async for item in gen:
                await queue.put((i, item))
            await queue.put((i, done))
        except Exception as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            await queue.put((i, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))


async def primed(gen: AsyncIterator, request: Request | None = None) -> AsyncIterator:
    """Run `gen` to its first item now (so refusals and errors become HTTP statuses) and
    return an iterator over all its items that closes `gen` when closed.

    With `request`, a client that disconnects meanwhile (still queued for a slot, or waiting
    for the engine's first step) cancels the wait, which frees its slot and engine request at
    once (ApiError 499)."""
    if request is None:
        first = await gen.__anext__()
    else:
        first = await until_disconnect(request, gen.__anext__())

    async def chain():
        try:
            yield first
            async for item in gen:
                yield item
        finally:
            await gen.aclose()

    return chain()


async def until_disconnect(request: Request, work) -> object:
    """Await `work` (a coroutine), cancelling it (and so aborting its engine requests) if the
    client disconnects first."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ApiError(499, "client closed the request")
    return task.result()
