"""Where answers come from: a local model through Corral's engine, or any OpenAI-compatible
endpoint through the `openai` client. Both satisfy `Backend`, so the runner, the judge and the
tests (with a fake) do not care which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from corral.errors import CorralError
from corral.sampling_params import SamplingParams

Conversation = list[dict]
Progress = Callable[[int], None] | None


@dataclass
class Reply:
    """One answer, or the error that prevented it."""

    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0
    error: str | None = None


class Backend(Protocol):
    name: str

    def chat(self, conversations: list[Conversation], params: SamplingParams,
             progress: Progress = None) -> list[Reply]:
        """One reply per conversation, in order; a failure is a Reply with `error`."""
        ...

    def continuation_logprobs(self, context: str, continuations: list[str]
                              ) -> list[tuple[float, int]]:
        """(sum of log-probs of the continuation's tokens given `context`, token count) for
        each continuation."""
        ...


class LocalBackend:
    """A local model through `corral.LLM`; a batch goes to the engine at once so its
    continuous batching runs the questions together."""

    def __init__(self, llm=None, name: str = "local", engine_kwargs: dict | None = None):
        self._llm = llm
        self.name = name
        self.engine_kwargs = engine_kwargs or {}

    @classmethod
    def load(cls, model: str, **engine_kwargs) -> LocalBackend:
        """A backend that loads `model` on first use (a resumed run with nothing left to ask
        never loads it)."""
        return cls(None, model, engine_kwargs)

    @property
    def llm(self):
        if self._llm is None:
            from corral import LLM

            self._llm = LLM(model=self.name, **self.engine_kwargs)
        return self._llm

    def chat(self, conversations: list[Conversation], params: SamplingParams,
             progress: Progress = None) -> list[Reply]:
        t0 = time.perf_counter()
        try:
            outs = self.llm.chat(conversations, params, use_tqdm=False)
        except CorralError:
            raise
        except Exception:  # noqa: BLE001 - isolated and recorded per question below
            # One bad conversation must not sink the batch: retry one by one to isolate it.
            return [self._chat_one(c, params, progress) for c in conversations]
        wall = (time.perf_counter() - t0) / max(len(conversations), 1)
        replies = [self._reply(o, wall) for o in outs]
        if progress:
            progress(len(replies))
        return replies

    def _chat_one(self, conv: Conversation, params: SamplingParams, progress: Progress) -> Reply:
        t0 = time.perf_counter()
        try:
            reply = self._reply(self.llm.chat([conv], params, use_tqdm=False)[0], 0.0)
            reply.seconds = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - recorded on the question, retried on resume
            reply = Reply(error=f"{type(e).__name__}: {e}".splitlines()[0],
                          seconds=time.perf_counter() - t0)
        if progress:
            progress(1)
        return reply

    @staticmethod
    def _reply(out, fallback_seconds: float) -> Reply:
        m = getattr(out, "metrics", None)
        seconds = fallback_seconds
        if m is not None and m.finished_time and m.arrival_time:
            seconds = m.finished_time - m.arrival_time
        if out.error or out.finish_reason == "error":
            return Reply(error=out.error or "engine error", seconds=seconds)
        return Reply(text=out.text, finish_reason=out.finish_reason,
                     completion_tokens=len(out.token_ids), seconds=seconds)

    def continuation_logprobs(self, context: str, continuations: list[str]
                              ) -> list[tuple[float, int]]:
        tok = self.llm.tokenizer
        if tok is None:
            raise CorralError("choice scoring needs a model with a tokenizer")
        prompts, starts = [], []
        ctx = tok.encode(context)
        for cont in continuations:
            full = tok.encode(context + cont)
            # Tokenize jointly (merges across the boundary are how the model saw text); fall
            # back to separate pieces when the joint ids do not start with the context's.
            ids = full if full[: len(ctx)] == ctx else ctx + tok.encode(cont,
                                                                       add_special_tokens=False)
            prompts.append(ids)
            starts.append(len(ctx))
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        scores = []
        for ids, start, out in zip(prompts, starts, outs):
            if out.error or out.prompt_logprobs is None:
                raise RuntimeError(out.error or "engine returned no prompt_logprobs")
            lps = [out.prompt_logprobs[i][ids[i]] for i in range(start, len(ids))]
            scores.append((float(sum(lps)), len(lps)))
        return scores


class EndpointBackend:
    """An OpenAI-compatible server (`corral serve`, vLLM, TGI, ...); `concurrency` requests
    in flight at once from a thread pool."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 concurrency: int = 8, timeout: float = 600.0):
        import openai

        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY",
                                    timeout=timeout, max_retries=1)
        self.base_url = base_url
        self.concurrency = max(1, concurrency)
        self.model = model or self._first_model()
        self.name = f"{self.model}@{base_url}"

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except Exception as e:  # noqa: BLE001 - any failure here means unreachable
            raise CorralError(f"cannot reach endpoint {self.base_url}: "
                              f"{type(e).__name__}: {e}".splitlines()[0]) from None
        if not models:
            raise CorralError(f"endpoint {self.base_url} lists no models; pass --endpoint-model")
        return models[0].id

    @staticmethod
    def _request_kwargs(params: SamplingParams) -> dict:
        kw: dict = {"temperature": params.temperature, "top_p": params.top_p,
                    "max_tokens": params.max_tokens, "seed": params.seed,
                    "presence_penalty": params.presence_penalty,
                    "frequency_penalty": params.frequency_penalty}
        if params.stop:
            kw["stop"] = params.stop
        # vLLM-style extras; servers that do not know them ignore extra_body fields.
        extra = {k: v for k, v, off in (("top_k", params.top_k, 0), ("min_p", params.min_p, 0.0),
                                        ("repetition_penalty", params.repetition_penalty, 1.0))
                 if v != off}
        if extra:
            kw["extra_body"] = extra
        return {k: v for k, v in kw.items() if v is not None}

    def _chat_one(self, conv: Conversation, kw: dict) -> Reply:
        t0 = time.perf_counter()
        try:
            r = self.client.chat.completions.create(model=self.model, messages=conv, **kw)
            choice = r.choices[0]
            tokens = r.usage.completion_tokens if r.usage else None
            return Reply(text=choice.message.content or "", finish_reason=choice.finish_reason,
                         completion_tokens=tokens, seconds=time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - recorded on the question, retried on resume
            return Reply(error=f"{type(e).__name__}: {e}".splitlines()[0],
                         seconds=time.perf_counter() - t0)

    def chat(self, conversations: list[Conversation], params: SamplingParams,
             progress: Progress = None) -> list[Reply]:
        kw = self._request_kwargs(params)

        def one(conv: Conversation) -> Reply:
            reply = self._chat_one(conv, kw)
            if progress:
                progress(1)
            return reply

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(one, conversations))

    def continuation_logprobs(self, context: str, continuations: list[str]
                              ) -> list[tuple[float, int]]:
        # /v1/completions with echo + logprobs returns the prompt tokens' log-probs and their
        # character offsets; the continuation's tokens are those ending past the context.
        scores = []
        for cont in continuations:
            r = self.client.completions.create(model=self.model, prompt=context + cont,
                                               max_tokens=1, temperature=0.0, echo=True,
                                               logprobs=0)
            lp = r.choices[0].logprobs
            if lp is None or not lp.token_logprobs or lp.text_offset is None:
                raise RuntimeError("endpoint does not return echo logprobs "
                                   "(choice questions need /v1/completions echo+logprobs)")
            n_prompt = r.usage.prompt_tokens if r.usage else len(lp.tokens) - 1
            picked = [v for tok, off, v in zip(lp.tokens[:n_prompt], lp.text_offset[:n_prompt],
                                               lp.token_logprobs[:n_prompt])
                      if off + len(tok) > len(context) and v is not None]
            scores.append((float(sum(picked)), len(picked)))
        return scores


def open_backend(target: str, *, endpoint: bool, api_key: str | None = None,
                 endpoint_model: str | None = None, concurrency: int = 8,
                 engine_kwargs: dict | None = None) -> Backend:
    """A backend for a model name/folder (local) or a base URL (endpoint)."""
    if endpoint:
        if not target.startswith(("http://", "https://")):
            raise CorralError(f"--endpoint must be an http(s) URL, got {target!r}")
        return EndpointBackend(target, api_key, endpoint_model, concurrency)
    return LocalBackend.load(target, **(engine_kwargs or {}))
