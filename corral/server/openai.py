"""OpenAI routes: /v1/chat/completions, /v1/completions, /v1/models (shapes as OpenAI's)."""

from __future__ import annotations

import json
import time
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from corral.errors import CorralError
from corral.sampling_params import ParamError, SamplingParams
from corral.server import tools as chat_tools
from corral.server.constraints import body_constraint
from corral.server.errors import ApiError
from corral.server.protocol import ChatCompletionRequest, CompletionRequest
from corral.server.serving import Serving, primed, until_disconnect
from corral.server.sse import SSEResponse, sse

router = APIRouter()
FINGERPRINT = "corral"  # OpenAI's system_fingerprint (TGI's client requires one)


def _serving(request: Request) -> Serving:
    return request.app.state.serving


def check_vocab(s: Serving, params: SamplingParams) -> None:
    """stop_token_ids must be ids of this model's vocabulary (the sampler indexes with them)."""
    try:
        params.validate(vocab_size=s.vocab_size)
    except ParamError as e:
        raise ApiError(400, str(e), param=e.param) from None


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


# ---- chat -------------------------------------------------------------------------------

def _chat_logprobs(s: Serving, token_ids: list[int], logprobs: list[dict] | None,
                   top: int) -> dict | None:
    if logprobs is None:
        return None

    def entry(tid: int, lp: float) -> dict:
        return {"token": s.token_text(tid), "logprob": lp, "bytes": s.token_bytes(tid)}

    content = []
    for tid, lps in zip(token_ids, logprobs):
        best = sorted(lps.items(), key=lambda kv: -kv[1])[:top]
        content.append({**entry(tid, lps[tid]), "top_logprobs": [entry(t, v) for t, v in best]})
    return {"content": content, "refusal": None}


def _delta(content: str | None) -> dict:
    # role and tool_calls on every delta: TGI's `text_generation` client requires both
    return {"role": "assistant", "content": content, "tool_calls": None}


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    s, rec = _serving(request), request.state.record
    model, lora = s.check_model(body.model)
    body.check_caps(s.config)
    parser = chat_tools.choose_parser(s.config.tool_parser, s.engine.chat_format.name,
                                      s.tokenizer)
    plan = chat_tools.make_plan(body.tools, body.tool_choice, body.parallel_tool_calls, parser)
    messages = chat_tools.request_messages(body.messages)
    try:
        ids = chat_tools.encode_messages(s.engine, messages, plan, parser)
    except (ValueError, CorralError) as e:
        raise ApiError(400, f"cannot render these messages: {e}", param="messages") from None
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
    max_tokens = s.budget(len(ids), body.requested_max_tokens, body.max_tokens_param)
    params = body.sampling(max_tokens, (body.top_logprobs or 0) if body.logprobs else None)
    check_vocab(s, params)
    params = s.engine.chat_params(params)  # the chat format's end-of-turn tokens stop it
    params = _constrained(params, body, plan)
    if s.config.log_prompts:
        rec.prompt = json.dumps(messages)
    rid, created, top = f"chatcmpl-{rec.id}", int(time.time()), body.top_logprobs or 0
    updates = s.run(rec, [(ids, params, rid)], lora)

    if not body.stream:
        async def collect():
            last = None
            async for _, out in updates:
                last = out
            return last

        out = await until_disconnect(request, collect())
        choices = []
        for c in out.outputs:
            message, finish = chat_tools.final_choice(plan, c)
            choices.append({"index": c.index, "message": message,
                            "logprobs": _chat_logprobs(s, c.token_ids, c.logprobs, top),
                            "finish_reason": finish})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": model, "system_fingerprint": FINGERPRINT,
                             "choices": choices,
                             "usage": _usage(rec.prompt_tokens, rec.completion_tokens)})

    updates = await primed(updates, request)
    extra = {"usage": None} if body.include_usage else {}

    def chunk(choices: list[dict], **more) -> str:
        return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model, "system_fingerprint": FINGERPRINT, "choices": choices,
                    **extra, **more})

    streamers = ({i: plan.streamer() for i in range(params.n)}
                 if plan is not None and plan.mode != "none" else {})

    async def events():
        done: set[int] = set()
        for i in range(params.n):
            yield chunk([{"index": i, "delta": _delta(""),
                          "logprobs": None, "finish_reason": None}])
        async for _, out in updates:
            for c in out.outputs:
                text, calls, finish = c.delta_text, [], c.finish_reason
                streamer = streamers.get(c.index)
                if streamer is not None and c.index not in done:
                    text, calls = streamer.feed(c.delta_text, bool(c.finish_reason))
                    if streamer.calls and finish == "stop":
                        finish = "tool_calls"
                if text or (c.delta_token_ids and body.logprobs):
                    lp = _chat_logprobs(s, c.delta_token_ids, c.delta_logprobs, top)
                    yield chunk([{"index": c.index, "delta": _delta(text),
                                  "logprobs": lp, "finish_reason": None}])
                if calls:
                    yield chunk([{"index": c.index, "delta": {**_delta(None), "tool_calls": calls},
                                  "logprobs": None, "finish_reason": None}])
                if c.finish_reason and c.index not in done:
                    done.add(c.index)
                    yield chunk([{"index": c.index, "delta": _delta(None), "logprobs": None,
                                  "finish_reason": finish}])
        if body.include_usage:
            yield chunk([], usage=_usage(rec.prompt_tokens, rec.completion_tokens))
        yield "data: [DONE]\n\n"

    return SSEResponse(events())


def _constrained(params, body, plan=None):
    """params with the body's output constraint (response_format, structured_outputs, or a
    forced tool call)."""
    so = body_constraint(body)
    tool_so = plan.structured() if plan is not None else None
    if so is not None and tool_so is not None:
        raise ApiError(400, f"tool_choice {plan.mode!r} cannot be combined with {so.param}",
                       param="tool_choice")
    so = so or tool_so
    return params if so is None else replace(params, structured=so)


# ---- completions ------------------------------------------------------------------------

def _prompts(s: Serving, prompt) -> list[tuple[str, list[int]]]:
    """(text, ids) per prompt; prompts may be text or token ids, one or a list."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise ApiError(400, "prompt must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    if len(prompt) > s.config.max_prompts:
        raise ApiError(400, f"at most {s.config.max_prompts} prompts per request, got "
                            f"{len(prompt)}", param="prompt")
    vocab = s.vocab_size
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, s.encode(p)))
        else:
            if any(not 0 <= t < vocab for t in p):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append((s.tokenizer.decode(p), list(p)))
    return out


def _completion_logprobs(s: Serving, ids: list[int], lps: list[dict | None],
                         offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for tid, lp in zip(ids, lps):
        text = s.token_text(tid)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        if lp is None:  # the first prompt token has no context
            token_lps.append(None)
            tops.append(None)
        else:
            token_lps.append(lp[tid])
            tops.append({s.token_text(t): v for t, v in sorted(lp.items(), key=lambda kv: -kv[1])})
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops,
            "text_offset": offsets}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request):
    s, rec = _serving(request), request.state.record
    model, lora = s.check_model(body.model)
    body.check_caps(s.config)
    if body.suffix:
        raise ApiError(400, "suffix is not supported", param="suffix")
    if body.best_of not in (None, body.n):
        raise ApiError(400, "best_of other than n is not supported", param="best_of")
    if body.echo and body.stream and body.logprobs is not None:
        raise ApiError(400, "echo with logprobs is not supported when streaming", param="echo")
    prompts = _prompts(s, body.prompt)
    # max_tokens=0 with echo scores the prompt only: generate one token and drop it.
    score_only = body.echo and body.max_tokens == 0
    want = 1 if score_only else body.max_tokens
    rid, created = f"cmpl-{rec.id}", int(time.time())
    jobs = []
    for i, (_, ids) in enumerate(prompts):
        params = body.sampling(s.budget(len(ids), want), body.logprobs,
                               body.logprobs if body.echo and body.logprobs is not None else None)
        check_vocab(s, params)
        params = _constrained(params, body)
        jobs.append((ids, params, f"{rid}-{i}"))
    if s.config.log_prompts:
        rec.prompt = json.dumps([t for t, _ in prompts])
    n = body.n
    updates = s.run(rec, jobs, lora)

    if not body.stream:
        async def collect():
            last = {}
            async for i, out in updates:
                last[i] = out
            return last

        outs = await until_disconnect(request, collect())
        choices = []
        for i, (text, ids) in enumerate(prompts):
            out = outs[i]
            for c in out.outputs:
                gen_text, gen_ids = ("", []) if score_only else (c.text, c.token_ids)
                gen_lps = [] if score_only else (c.logprobs or [])
                lp = None
                if body.logprobs is not None:
                    if body.echo:
                        lp = _completion_logprobs(s, ids + gen_ids,
                                                  list(out.prompt_logprobs or []) + gen_lps, 0)
                    else:
                        lp = _completion_logprobs(s, gen_ids, gen_lps, len(text))
                choices.append({"index": i * n + c.index,
                                "text": (text if body.echo else "") + gen_text, "logprobs": lp,
                                "finish_reason": "length" if score_only else c.finish_reason})
        completion_tokens = 0 if score_only else rec.completion_tokens
        return JSONResponse({"id": rid, "object": "text_completion", "created": created,
                             "model": model, "choices": choices,
                             "usage": _usage(rec.prompt_tokens, completion_tokens)})

    updates = await primed(updates, request)
    extra = {"usage": None} if body.include_usage else {}

    def chunk(choices: list[dict], **more) -> str:
        return sse({"id": rid, "object": "text_completion", "created": created,
                    "model": model, "choices": choices, **extra, **more})

    async def events():
        echoed: set[int] = set()
        done: set[int] = set()
        async for i, out in updates:
            for c in out.outputs:
                index = i * n + c.index
                if index in done:
                    continue
                text = c.delta_text
                if body.echo and index not in echoed:
                    echoed.add(index)
                    text = prompts[i][0] + text
                if c.finish_reason:
                    done.add(index)
                if text or c.finish_reason or (c.delta_token_ids and body.logprobs is not None):
                    lp = None
                    if body.logprobs is not None:
                        lp = _completion_logprobs(s, c.delta_token_ids, c.delta_logprobs or [],
                                                  0)
                    yield chunk([{"index": index, "text": text, "logprobs": lp,
                                  "finish_reason": c.finish_reason}])
        if body.include_usage:
            yield chunk([], usage=_usage(rec.prompt_tokens, rec.completion_tokens))
        yield "data: [DONE]\n\n"

    return SSEResponse(events())


# ---- models -----------------------------------------------------------------------------

def _model_card(s: Serving, name: str) -> dict:
    card = {"id": name, "object": "model", "created": int(s.started), "owned_by": "corral",
            "max_model_len": s.config.max_total_tokens}
    if name in s.lora_names and name not in s.model_names:  # vLLM's shape for an adapter
        card.update(root=name, parent=s.config.model_name)
    return card


@router.get("/v1/models")
async def list_models(request: Request):
    s = _serving(request)
    return {"object": "list", "data": [_model_card(s, n) for n in s.model_names + s.lora_names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request):
    s = _serving(request)
    return _model_card(s, s.check_model(model)[0])
