"""TGI routes: /generate, /generate_stream, / (TGI's compat route), /info (TGI's shapes)."""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from corral.server.constraints import from_tgi_grammar
from corral.server.protocol import TGIRequest
from corral.server.serving import Serving, primed, until_disconnect
from corral.server.sse import SSEResponse, sse

router = APIRouter()


def _finish(c) -> str:
    if c.finish_reason == "length":
        return "length"
    if c.finish_reason == "stop":
        return "stop_sequence" if isinstance(c.stop_reason, str) else "eos_token"
    return c.finish_reason or "length"


class _Job:
    """One TGI request prepared for the engine."""

    def __init__(self, s: Serving, body: TGIRequest, request: Request):
        self.s, self.body, self.rec = s, body, request.state.record
        body.check_caps(s.config)
        ids = s.encode(body.inputs)
        p = body.parameters
        if p.truncate:
            ids = ids[-p.truncate:]
        self.ids = ids
        self.params = body.sampling(s.budget(len(ids), p.max_new_tokens, "max_new_tokens"))
        structured = from_tgi_grammar(p.grammar)
        if structured is not None:
            self.params = replace(self.params, structured=structured)
        self.lora = s.check_lora(p.lora)
        self.special = set(getattr(s.tokenizer, "all_special_ids", []))
        if s.config.log_prompts:
            self.rec.prompt = body.inputs

    def updates(self):
        return self.s.run(self.rec, [(self.ids, self.params, f"tgi-{self.rec.id}")], self.lora)

    def token(self, tid: int, lps: dict | None, text: str | None = None) -> dict:
        lp = lps.get(tid) if lps else None
        return {"id": tid, "text": self.s.token_text(tid) if text is None else text,
                "logprob": lp, "special": tid in self.special}

    def top(self, lps: dict | None) -> list[dict]:
        k = self.body.parameters.top_n_tokens or 0
        best = sorted((lps or {}).items(), key=lambda kv: -kv[1])[:k]
        return [self.token(t, lps) for t, _ in best]


async def _generate(s: Serving, body: TGIRequest, request: Request) -> dict:
    job = _Job(s, body, request)

    async def collect():
        last = None
        async for _, out in job.updates():
            last = out
        return last

    out = await until_disconnect(request, collect())
    c = out.outputs[0]
    text = (body.inputs if body.parameters.return_full_text else "") + c.text
    result: dict = {"generated_text": text}
    if body.parameters.details:
        lps = c.logprobs or [None] * len(c.token_ids)
        prefill = []
        if body.parameters.decoder_input_details:
            plps = out.prompt_logprobs or [None] * len(job.ids)
            prefill = [{"id": t, "text": s.token_text(t),
                        "logprob": lp.get(t) if lp else None} for t, lp in zip(job.ids, plps)]
        result["details"] = {
            "finish_reason": _finish(c), "generated_tokens": len(c.token_ids),
            "seed": job.params.seed, "prefill": prefill,
            "tokens": [job.token(t, lp) for t, lp in zip(c.token_ids, lps)]}
        if body.parameters.top_n_tokens:
            result["details"]["top_tokens"] = [job.top(lp) for lp in lps]
    return result


@router.post("/generate")
async def generate(body: TGIRequest, request: Request):
    return JSONResponse(await _generate(request.app.state.serving, body, request))


@router.post("/generate_stream")
async def generate_stream(body: TGIRequest, request: Request):
    job = _Job(request.app.state.serving, body, request)
    updates = await primed(job.updates(), request)

    def event(tok: dict, top: list | None, text: str | None = None,
              details: dict | None = None) -> str:
        return sse({"index": tok["index"], "token": tok["token"], "top_tokens": top,
                    "generated_text": text, "details": details}, prefix="data:")

    async def events():
        pending, count = None, 0  # the last token is held back to carry the final details
        async for _, out in updates:
            c = out.outputs[0]
            lps = c.delta_logprobs or [None] * len(c.delta_token_ids)
            for j, (tid, lp) in enumerate(zip(c.delta_token_ids, lps)):
                if pending is not None:
                    yield event(pending, pending["top"])
                count += 1
                # The detokenizer's text for this update goes on its last token.
                last = j == len(c.delta_token_ids) - 1
                pending = {"index": count, "token": job.token(tid, lp, c.delta_text if last
                                                              else ""),
                           "top": job.top(lp) if body.parameters.top_n_tokens else None}
            if not c.delta_token_ids and c.delta_text and pending is not None:
                pending["token"]["text"] += c.delta_text
            if c.finished and pending is not None:
                details = {"finish_reason": _finish(c), "generated_tokens": len(c.token_ids),
                           "seed": job.params.seed, "input_length": len(job.ids)}
                yield event(pending, pending["top"], c.text, details)
                pending = None

    return SSEResponse(events())


@router.post("/")
async def compat_generate(body: TGIRequest, request: Request):
    if body.stream:
        return await generate_stream(body, request)
    return JSONResponse([await _generate(request.app.state.serving, body, request)])


@router.get("/info")
async def info(request: Request):
    s: Serving = request.app.state.serving
    cfg, einfo = s.config, s.engine.info
    return {"model_id": s.config.model_name, "model_sha": None,
            "model_dtype": str(einfo.get("dtype")), "model_device_type": str(einfo.get("device")),
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": cfg.max_concurrent_requests, "max_best_of": 1,
            "max_stop_sequences": cfg.max_stop_sequences, "max_input_tokens": cfg.max_input_tokens,
            "max_input_length": cfg.max_input_tokens, "max_total_tokens": cfg.max_total_tokens,
            "validation_workers": 1, "max_client_batch_size": 1,
            "router": "corral", "version": _version(), "sha": None, "docker_label": None,
            "corral_weights": einfo.get("weights"),  # e.g. which CPU weight path decodes
            "corral_kv_cache_dtype": einfo.get("kv_cache_dtype"),
            # the OpenAI routes' caps (docs/serve.md, "Limits and validation")
            "corral_max_n": cfg.max_n, "corral_max_prompts": cfg.max_prompts,
            "corral_max_stop_length": cfg.max_stop_length,
            "corral_strict_model_names": cfg.strict_model_names}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("corral")
    except PackageNotFoundError:
        return "0"
