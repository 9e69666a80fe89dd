"""`corral serve`: flags -> AsyncLLM + ServerConfig -> uvicorn, with a graceful SIGTERM drain."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from corral.run.cli import (
    add_kernel_args,
    add_lora_args,
    kernel_kwargs_from_args,
    lora_kwargs_from_args,
)
from corral.server.config import ServerConfig


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI- and TGI-compatible HTTP API",
        description="Serve a model with OpenAI routes (/v1/chat/completions, /v1/completions, "
                    "/v1/models), TGI routes (/generate, /generate_stream, /info), /health and "
                    "/metrics.")
    p.add_argument("--model", default="default", help="alias, HF folder, .gguf file or hub id")
    p.add_argument("--served-model-name", default=None,
                   help="the name clients send as `model` (default: --model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    eng = p.add_argument_group("engine")
    eng.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    eng.add_argument("--device", default=None, help="auto, cpu, cuda")
    eng.add_argument("--chat-format", default=None, help="chat format (default: the model's)")
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=None)
    add_kernel_args(eng)
    add_lora_args(p.add_argument_group("LoRA adapters"), serving=True)
    lim = p.add_argument_group("limits and safety")
    lim.add_argument("--max-input-tokens", type=int, default=None,
                     help="longest prompt accepted (default: context length - 1); longer: 413")
    lim.add_argument("--max-total-tokens", type=int, default=None,
                     help="prompt + generated tokens per request (default: context length)")
    lim.add_argument("--max-concurrent-requests", type=int, default=64,
                     help="requests generating at once")
    lim.add_argument("--max-queue", type=int, default=256,
                     help="requests waiting for a slot; beyond that: 429 at once")
    lim.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024)
    lim.add_argument("--api-key", default=None,
                     help="require 'Authorization: Bearer KEY' (default: $CORRAL_API_KEY)")
    lim.add_argument("--cors-origin", action="append", default=[], dest="cors_origins",
                     metavar="ORIGIN", help="allow browser calls from ORIGIN (repeatable)")
    lim.add_argument("--drain-timeout", type=float, default=30.0,
                     help="seconds SIGTERM waits for in-flight requests before exiting")
    lim.add_argument("--log-prompts", action="store_true",
                     help="include prompt text in the per-request JSON log lines")
    p.set_defaults(func=serve)


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_name=args.served_model_name or args.model, host=args.host, port=args.port,
        max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
        max_concurrent_requests=args.max_concurrent_requests, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None,
        cors_origins=args.cors_origins, drain_timeout=args.drain_timeout,
        log_prompts=args.log_prompts)


def serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (draining in-flight requests)."""
    import uvicorn

    from corral import AsyncLLM
    from corral.server.app import create_app

    config = config_from_args(args)
    engine_kw = {k: getattr(args, k) for k in ("dtype", "device", "chat_format", "max_model_len",
                                               "kv_cache_memory_gb", "max_num_seqs")
                 if getattr(args, k) is not None}
    engine_kw.update(kernel_kwargs_from_args(args))
    engine_kw.update(lora_kwargs_from_args(args))
    _setup_logging()
    engine = AsyncLLM(model=args.model, **engine_kw)
    try:
        app = create_app(engine, config)
        admission = app.state.serving.admission

        class DrainingServer(uvicorn.Server):
            def handle_exit(self, sig, frame):  # refuse new work (503), finish what runs
                admission.draining = True
                super().handle_exit(sig, frame)

            @contextlib.contextmanager
            def capture_signals(self):
                with super().capture_signals():
                    yield
                    # uvicorn re-raises the signal after shutdown; a finished drain is a
                    # clean exit (0), and the engine still gets shut down below.
                    getattr(self, "_captured_signals", []).clear()

        server = DrainingServer(uvicorn.Config(
            app, host=config.host, port=config.port, access_log=False, log_level="info",
            timeout_graceful_shutdown=config.drain_timeout, timeout_keep_alive=5))
        server.run()
    finally:
        engine.shutdown()
    return 0


def _setup_logging() -> None:
    # The per-request JSON lines go to stderr as they are (one object per line).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("corral.server")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
