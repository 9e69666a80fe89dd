"""The public engine API: LLM for offline batches, AsyncLLM for streaming servers and UIs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Sequence

from corral.engine.config import EngineConfig
from corral.engine.core import EngineCore, EngineStats
from corral.outputs import RequestOutput
from corral.sampling_params import SamplingParams

Prompt = str | list[int]
Message = dict[str, str]

log = logging.getLogger("corral.engine")


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an error; nothing more will run in this process."""


class EngineShutdownError(RuntimeError):
    """The engine was shut down (or the server stopped draining) before the request ended."""


class _Frontend:
    """What LLM and AsyncLLM share: the loaded core and chat rendering."""

    core: EngineCore

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def chat_format(self):
        return self.core.chat_format

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def info(self) -> dict:
        return self.core.info

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Exactly the token ids `chat` sends for this conversation."""
        from corral.chat import encode_chat

        return encode_chat(self.tokenizer, self.chat_format, messages, add_generation_prompt)

    def chat_params(self, params: SamplingParams) -> SamplingParams:
        """Add the chat format's stops to `params`: its end-of-turn tokens and the multi-token
        markers of another turn it lists as stop strings (corral.chat.formats), which then
        end the answer and are cut from it."""
        fmt = self.chat_format
        extra = [t for t in fmt.stop_token_ids(self.tokenizer)
                 if t not in params.stop_token_ids and t not in self.core.eos_token_ids]
        strings = ([s for s in fmt.text_stops(self.tokenizer) if s not in params.stop]
                   if params.detokenize else [])
        if not extra and not strings:
            return params
        from dataclasses import replace

        return replace(params, stop_token_ids=params.stop_token_ids + extra,
                       stop=params.stop + strings)


class LLM(_Frontend):
    """Offline batched generation: `LLM(model="default").generate(prompts, SamplingParams())`."""

    def __init__(self, model: str = "default", **kwargs):
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self.core = EngineCore(self.config)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, lora=None) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists.
        `lora`: a LoRARequest (or adapter name) for every prompt, or a list with one per
        prompt (None: the base); needs enable_lora=True."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        return self._run(list(prompts), params, use_tqdm, lora)

    def chat(self, conversations: list[Message] | list[list[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True, lora=None) -> list[RequestOutput]:
        """Render each conversation with the model's chat format and generate its answer."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        plist = _per_prompt(params, len(conversations))
        ids = [self.encode_chat(c) for c in conversations]
        return self._run(ids, [self.chat_params(p) for p in plist], use_tqdm, lora)

    def _run(self, prompts: list[Prompt], params, use_tqdm: bool,
             lora=None) -> list[RequestOutput]:
        plist = _per_prompt(params, len(prompts))
        loras = list(lora) if isinstance(lora, (list, tuple)) else [lora] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError(f"got {len(loras)} LoRA requests for {len(prompts)} prompts")
        order = []
        try:
            for prompt, p, lr in zip(prompts, plist, loras):
                rid = f"llm-{next(self._ids)}"
                self.core.add_request(rid, prompt, p, lora=lr)
                order.append(rid)
        except BaseException:
            for rid in order:  # nothing of a refused batch stays queued for the next call
                self.core.abort(rid)
            raise
        done: dict[str, RequestOutput] = {}
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(order), desc="Generating", unit="req", dynamic_ncols=True)
        generated = 0
        while self.core.has_work():
            for out in self.core.step():
                generated += sum(len(o.delta_token_ids) for o in out.outputs)
                if out.finished:
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                elapsed = bar.format_dict["elapsed"] or 1e-9
                bar.set_postfix_str(f"{generated / elapsed:.1f} tok/s", refresh=False)
        if bar is not None:
            bar.close()
        return [done[r] for r in order]

    def stats(self) -> EngineStats:
        return self.core.stats()

    def close(self) -> None:
        """Stop the tensor-parallel worker processes, if any (they also exit with this one)."""
        self.core.close()

    def __enter__(self) -> LLM:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncLLM(_Frontend):
    """The engine in a background thread; `async for out in engine.stream(prompt, params)`.

    The thread owns the EngineCore. Callers send add/abort commands through a queue; outputs
    come back to each caller's asyncio queue on the caller's event loop. A request that fails
    (bad values, a non-finite row of logits, ...) ends with `error` set while the others run
    on; if the thread itself ever dies, `error` says why, every open stream gets
    EngineDeadError and new ones are refused with it.
    """

    def __init__(self, model: str = "default", **kwargs):
        self.config = EngineConfig.from_kwargs(model=model, **kwargs)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None  # set if the engine thread crashed
        # The engine thread loads the model itself: steps run ~30% slower on CPU when the
        # weights and torch's thread pool were set up by another thread (measured on SmolLM2:
        # prefill of 32 prompts 0.8 s vs 1.3 s, decode step at batch 32 94 ms vs 135 ms).
        self._loaded = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="corral-engine", daemon=True)
        self._thread.start()
        self._loaded.wait()
        if self._load_error is not None:
            raise self._load_error

    # ---- caller side (event loop) ---------------------------------------------------------

    async def stream(self, prompt: Prompt, params: SamplingParams | None = None,
                     request_id: str | None = None,
                     lora=None) -> AsyncIterator[RequestOutput]:
        """Yield the request's state after every step that changed it; the last has
        finished=True. Leaving early (break, cancellation, client gone) aborts the request."""
        self._check_running()
        rid = request_id or uuid.uuid4().hex
        params = params or SamplingParams()
        if params.structured is not None and params.structured.compiled is None:
            # compile here, off the engine thread: a bad schema fails this caller alone
            await asyncio.get_running_loop().run_in_executor(
                None, self.core.compile_structured, params)
        q: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), q)
        finished = False
        try:
            # again: the thread may have died (and told every stream it knew) meanwhile
            self._check_running()
            self._commands.put(("add", rid, prompt, params, lora))
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self._commands.put(("abort", rid))

    async def generate(self, prompt: Prompt, params: SamplingParams | None = None,
                       request_id: str | None = None, lora=None) -> RequestOutput:
        """Run one request to the end and return its final output."""
        last = None
        async for last in self.stream(prompt, params, request_id, lora):
            pass
        return last

    async def load_lora(self, name: str, path: str) -> dict:
        """Read and check the adapter here (a worker thread: steps keep running), then hand
        it to the engine thread, which registers it between two steps."""
        manager = self.core._require_lora()
        adapter = await asyncio.to_thread(manager.load, name, path)
        await self._call("add_lora", adapter)
        return {"name": name, "path": adapter.path, "rank": adapter.rank,
                "bytes": adapter.nbytes}

    def lora_names(self) -> list[str]:
        """Names of the registered adapters (a snapshot; safe from any thread)."""
        lora = self.core.lora
        return list(lora.adapters) if lora is not None else []

    async def unload_lora(self, name: str) -> None:
        await self._call("remove_lora", name)

    async def _call(self, method: str, *args):
        """Run `self.core.<method>(*args)` on the engine thread; its error is raised here."""
        fut = concurrent.futures.Future()
        self._commands.put(("call", fut, method, args))
        return await asyncio.wrap_future(fut)

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def abort_all(self, reason: str) -> int:
        """End every open stream now with EngineShutdownError(reason) (callable from any
        thread); the engine frees their blocks at its next step boundary. Returns how many."""
        streams = list(self._streams.items())
        for rid, _ in streams:
            self._deliver(rid, EngineShutdownError(reason))
        return len(streams)

    @property
    def error(self) -> str | None:
        """None while the engine thread runs; else why it stopped (for /health)."""
        if self._dead is not None:
            return f"the engine stopped after an error: {self._dead!r}"
        tp = getattr(getattr(self, "core", None), "tp", None)
        if tp is not None and tp.failed is not None:  # seen by its watchdog, even when idle
            return f"the engine cannot run: {tp.failed}"
        if not self._thread.is_alive() and not self._stop.is_set():
            return "the engine thread is gone"
        return None

    def stats(self) -> EngineStats:
        """A snapshot taken by the engine thread after its latest step."""
        return self._stats

    def shutdown(self, timeout: float | None = 120.0) -> bool:
        """Stop the engine thread between two steps and wait for it (a step is bounded by the
        scheduler's token budget). True once the thread has ended.

        The wait matters: an interpreter that exits while the thread is still inside a torch
        kernel aborts the process ("terminate called without an active exception")."""
        self._stop.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        if self._thread.is_alive():
            return False
        self.core.close()
        return True

    def _check_running(self) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"the engine stopped after an error: {self._dead!r}")
        if self._stop.is_set():
            raise EngineShutdownError("the engine is shut down")

    # ---- engine thread ------------------------------------------------------------------

    def _deliver(self, rid: str, item) -> None:
        target = self._streams.get(rid)
        if target is not None:
            loop, q = target
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                self._streams.pop(rid, None)

    def _handle(self, cmd) -> None:
        if cmd[0] == "add":
            _, rid, prompt, params, lora = cmd
            try:
                self.core.add_request(rid, prompt, params, lora=lora)
            except BaseException as e:  # a tokenizer panic is a BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit, GeneratorExit)):
                    raise
                self._deliver(rid, e)  # CorralError / ValueError: that caller's 400
        elif cmd[0] == "call":
            _, fut, method, args = cmd
            try:
                fut.set_result(getattr(self.core, method)(*args))
            except Exception as e:  # noqa: BLE001 - handed back to the caller
                fut.set_exception(e)
        elif cmd[0] == "abort":
            out = self.core.abort(cmd[1])
            if out is not None:
                self._deliver(cmd[1], out)

    def _run(self) -> None:
        try:
            self.core = EngineCore(self.config)
            self._stats = self.core.stats()
        except BaseException as e:  # noqa: BLE001 - reported to the constructor's caller
            self._load_error = e
            return
        finally:
            self._loaded.set()
        try:
            self._loop()
        except BaseException as e:  # a bug, not a bad request: fail every open stream loudly
            self._dead = e  # first, so a stream opened from now on refuses itself
            log.critical("the engine thread died; every request fails from now on and "
                         "/health answers 503: %r", e, exc_info=e)
            err = EngineDeadError(f"the engine stopped after an error: {e!r}")
            for rid in list(self._streams):
                self._deliver(rid, err)
            self.core.close()  # tensor-parallel workers: end the survivors

    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.core.has_work()
            try:
                cmd = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
                self._handle(cmd)
                while True:  # drain everything that queued up during the last step
                    self._handle(self._commands.get_nowait())
            except queue.Empty:
                pass
            if self.core.has_work():
                for out in self.core.step():
                    self._deliver(out.request_id, out)
            self._stats = self.core.stats()
        # shutting down: tell every open stream
        for rid in list(self.core.requests):
            out = self.core.abort(rid)
            if out is not None:
                self._deliver(rid, out)


def _per_prompt(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    params = list(params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
    return params
