"""The FastAPI app: OpenAI + TGI routes over one AsyncLLM, with auth, limits and metrics.

`create_app(engine, config)` builds everything per app (no module globals), so tests can run
several apps side by side and the CLI only adds uvicorn and signal handling.
"""

from __future__ import annotations

import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from corral.server import lora, openai, tgi
from corral.server.auth import bearer_ok
from corral.server.config import ServerConfig
from corral.server.errors import ApiError, error_response
from corral.server.limits import Admission
from corral.server.metrics import ServerMetrics
from corral.server.serving import RequestRecord, Serving, new_id

log = logging.getLogger("corral.server")

RETRY_AFTER = "1"  # seconds, on 429 (queue full) and 503 (draining, engine dead)

ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/generate",
                    "/generate_stream", "/", "/info", "/health", "/metrics",
                    "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/lora_adapters"})


class BodyTooLarge(HTTPException):
    """An HTTPException so FastAPI's body parsing lets it through as a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit} bytes")


class Gate:
    """Outer ASGI layer: request id, auth, body-size limit, then one JSON log line and the
    request counter once the response (streamed or not) has ended."""

    def __init__(self, app, serving: Serving):
        self.app, self.serving = app, serving

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cfg = scope["path"], self.serving.config
        rec = RequestRecord(id=new_id(), method=scope["method"], path=path)
        scope.setdefault("state", {})["record"] = rec
        status, started = 500, False

        async def send_logged(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", []).append((b"x-request-id", rec.id.encode()))
            await send(message)

        received = 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > cfg.max_body_bytes:
                raise BodyTooLarge(cfg.max_body_bytes)
            return message

        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        try:
            if scope["method"] != "OPTIONS" and not bearer_ok(cfg.api_key, headers, path):
                err = ApiError(401, "invalid or missing API key (send Authorization: Bearer "
                                    "<key>)", code="invalid_api_key")
                resp = error_response(path, err, {"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_logged)
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_body_bytes:
                resp = error_response(path, ApiError(413, str(BodyTooLarge(cfg.max_body_bytes)
                                                               .detail)))
                return await resp(scope, receive, send_logged)
            try:
                await self.app(scope, receive_limited, send_logged)
            except Exception as e:
                # Answered here, not re-raised: an exception that reaches uvicorn makes it
                # close the keep-alive connection after every 500.
                if status != 500 or started:
                    raise  # mid-response: nothing better than closing the connection
                log.exception("request failed")
                resp = error_response(path, ApiError(500, f"internal error: {e}"))
                await resp(scope, receive, send_logged)
        finally:
            self._done(rec, status)

    def _done(self, rec: RequestRecord, status: int) -> None:
        duration = time.perf_counter() - rec.start
        m = self.serving.metrics
        m.requests.labels(rec.path if rec.path in ROUTES else "other", str(status)).inc()
        if rec.path not in ("/metrics", "/health"):
            m.duration.observe(duration)
        line = {"id": rec.id, "method": rec.method, "path": rec.path, "status": status,
                "prompt_tokens": rec.prompt_tokens, "completion_tokens": rec.completion_tokens,
                "ttft_ms": None if rec.ttft is None else round(rec.ttft * 1000, 1),
                "duration_ms": round(duration * 1000, 1)}
        if rec.prompt is not None:
            line["prompt"] = rec.prompt
        log.info(json.dumps(line))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """The first error's message and the field it names (`param`), e.g. "temperature"."""
    err = exc.errors()[0] if exc.errors() else {}
    loc = [p for p in err.get("loc", ()) if p != "body"]
    where = ".".join(str(p) for p in loc)
    if loc and loc[0] == "parameters" and len(loc) > 1:  # TGI's nested sampling fields
        loc = loc[1:]
    param = loc[0] if loc and isinstance(loc[0], str) else None
    return (f"{where}: {err.get('msg', 'invalid request')}" if where
            else err.get("msg", "invalid request body")), param


def create_app(engine, config: ServerConfig) -> FastAPI:
    """The HTTP app serving `engine` (an AsyncLLM) under `config`'s limits."""
    config.resolve(engine.max_model_len)
    serving = Serving(engine, config, ServerMetrics(),
                      Admission(config.max_concurrent_requests, config.max_queue))
    app = FastAPI(title="Corral", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serving = serving
    app.include_router(openai.router)
    app.include_router(tgi.router)
    app.include_router(lora.router)

    @app.get("/health")
    async def health():
        """200 while serving; 503 while draining for shutdown or once the engine thread has
        died (so an orchestrator stops routing here, or restarts the process)."""
        st, adm = engine.stats(), serving.admission
        dead = getattr(engine, "error", None)
        status = "error" if dead else "draining" if adm.draining else "ok"
        body = {"status": status, "running_requests": adm.running,
                "queued_requests": adm.queued,
                "num_running": st.num_running, "num_waiting": st.num_waiting,
                "num_free_blocks": st.num_free_blocks, "num_total_blocks": st.num_total_blocks}
        if dead:
            body["error"] = dead
        return JSONResponse(body, status_code=200 if status == "ok" else 503,
                            headers=None if status == "ok" else {"Retry-After": RETRY_AFTER})

    @app.get("/metrics")
    async def metrics():
        data = serving.metrics.render(engine.stats(), serving.admission.queued)
        return Response(data, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        retry = {"Retry-After": RETRY_AFTER} if exc.status in (429, 503) else None
        return error_response(request.url.path, exc, retry)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        msg = exc.detail
        if exc.status_code == 404:
            msg = f"no route for {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"{request.method} is not allowed on {request.url.path}"
        # starlette puts the route's methods in `Allow` on a 405; keep them
        return error_response(request.url.path, ApiError(exc.status_code, str(msg)),
                              dict(exc.headers or {}))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError):
        msg, param = _validation_message(exc)
        return error_response(request.url.path, ApiError(400, msg, param=param))

    @app.exception_handler(RecursionError)
    async def too_deep(request: Request, exc: RecursionError):
        # json.loads of a body nested thousands of levels deep
        return error_response(request.url.path, ApiError(400, "the JSON body is nested too "
                                                              "deeply"))

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("request failed")
        return error_response(request.url.path, ApiError(500, f"internal error: {exc}"))

    app.add_middleware(Gate, serving=serving)
    if config.cors_origins:  # outermost, so preflight requests never meet auth
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins,
                           allow_methods=["*"], allow_headers=["*"])
    return app
