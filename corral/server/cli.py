"""`corral serve`: flags -> AsyncLLM + ServerConfig -> uvicorn, with a graceful SIGTERM drain."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import threading

from corral.cli_args import (
    add_chat_format_arg,
    add_device_arg,
    add_dtype_arg,
    add_kernel_args,
    add_lora_args,
    add_parallel_args,
    check_chat_format,
    kernel_kwargs_from_args,
    lora_kwargs_from_args,
    parallel_kwargs_from_args,
)
from corral.errors import CorralError
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
    add_dtype_arg(eng, default=None)
    add_device_arg(eng, default=None)
    add_chat_format_arg(eng)
    eng.add_argument("--max-model-len", type=int, default=None)
    eng.add_argument("--kv-cache-memory-gb", type=float, default=None)
    eng.add_argument("--max-num-seqs", type=int, default=None)
    add_kernel_args(eng)
    add_parallel_args(eng)
    eng.add_argument("--tool-parser", default=None, choices=("hermes", "llama3_json"),
                     help="how tool calls are written and parsed (default: from the chat "
                          "format: llama3 -> llama3_json, others -> hermes)")
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
                     help="on SIGTERM/SIGINT, seconds to let in-flight requests finish (the "
                          "listener stays open: /health and new requests get 503) before the "
                          "rest end with an error; a second signal stops waiting")
    lim.add_argument("--log-prompts", action="store_true",
                     help="include prompt text in the per-request JSON log lines")
    lim.add_argument("--max-n", type=int, default=16, help="most choices (`n`) per request")
    lim.add_argument("--max-prompts", type=int, default=64,
                     help="most prompts in one /v1/completions request")
    lim.add_argument("--max-stop-sequences", type=int, default=16,
                     help="most stop strings (and stop_token_ids) per request")
    lim.add_argument("--strict-model-names", action="store_true",
                     help="404 for any `model` but the served names (default: like TGI, also "
                          "accept the placeholders its clients send: tgi, dummy, empty)")
    lim.add_argument("--header-timeout", type=float, default=10.0,
                     help="seconds a connection may take to send its request headers")
    lim.add_argument("--keep-alive-timeout", type=float, default=5.0,
                     help="seconds an idle keep-alive connection stays open")
    add_ray_args(p.add_argument_group(
        "replicas on Ray Serve (docs/scale.md; needs pip install 'corral[scale]')"))
    p.set_defaults(func=serve)


def add_ray_args(g) -> None:
    g.add_argument("--replicas", type=int, default=1,
                   help="engine replicas behind Ray Serve's HTTP proxy on --host/--port "
                        "(default 1: one plain server process, no Ray)")
    g.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of "
                        "starting a local one; implies Ray Serve even with --replicas 1")
    g.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                   help="Ray CPUs each replica reserves (default 1)")
    g.add_argument("--num-gpus-per-replica", type=float, default=0.0,
                   help="Ray GPUs each replica reserves (default 0; with tensor parallelism: "
                        "the ranks of one replica)")


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        model_name=args.served_model_name or args.model, host=args.host, port=args.port,
        max_input_tokens=args.max_input_tokens, max_total_tokens=args.max_total_tokens,
        max_concurrent_requests=args.max_concurrent_requests, max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
        api_key=args.api_key or os.environ.get("CORRAL_API_KEY") or None,
        cors_origins=args.cors_origins, drain_timeout=args.drain_timeout,
        log_prompts=args.log_prompts, max_n=args.max_n, max_prompts=args.max_prompts,
        max_stop_sequences=args.max_stop_sequences, strict_model_names=args.strict_model_names,
        header_timeout=args.header_timeout, keep_alive_timeout=args.keep_alive_timeout,
        tool_parser=getattr(args, "tool_parser", None))


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """AsyncLLM keyword arguments from the engine, LoRA and parallelism flags."""
    check_chat_format(args.chat_format)
    engine_kw = {k: getattr(args, k) for k in ("dtype", "device", "chat_format", "max_model_len",
                                               "kv_cache_memory_gb", "max_num_seqs")
                 if getattr(args, k) is not None}
    engine_kw.update(kernel_kwargs_from_args(args))
    engine_kw.update(lora_kwargs_from_args(args))
    engine_kw.update(parallel_kwargs_from_args(args))
    return engine_kw


def serve(args: argparse.Namespace) -> int:
    """Load the model, then serve until SIGINT/SIGTERM (draining in-flight requests)."""
    if args.replicas < 1:
        raise CorralError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas > 1 or args.ray_address:
        from corral.server.ray_app import run_cli

        return run_cli(args)
    import uvicorn

    from corral import AsyncLLM
    from corral.server.app import create_app
    from corral.server.drain import FLUSH_SECONDS, DrainingServer
    from corral.server.timeouts import h11_with_header_timeout

    config = config_from_args(args)
    engine_kw = engine_kwargs_from_args(args)
    _setup_logging()
    engine = AsyncLLM(model=args.model, **engine_kw)
    # The start-up's objects live as long as the server: out of every later collection, so a
    # full one pauses the event loop for the requests' objects only (~0.2 s otherwise with
    # SmolLM2 loaded, every stream's next token waiting).
    gc.freeze()
    try:
        app = create_app(engine, config)
        server = DrainingServer(uvicorn.Config(
            app, host=config.host, port=config.port, access_log=False, log_level="info",
            timeout_graceful_shutdown=FLUSH_SECONDS,
            timeout_keep_alive=config.keep_alive_timeout,
            http=h11_with_header_timeout(config.header_timeout)),
            app.state.serving, config.drain_timeout)
        if engine_kw.get("tensor_parallel_size", 1) > 1:
            threading.Thread(target=_stop_when_engine_fails, args=(engine, server),
                             name="corral-tp-supervisor", daemon=True).start()
        server.run()
        if engine.error is not None and engine_kw.get("tensor_parallel_size", 1) > 1:
            print(f"corral serve: stopped: {engine.error}", file=sys.stderr, flush=True)
            return 1
    finally:
        # Join the engine thread between two steps before the interpreter exits: exiting
        # while it is inside a torch kernel aborts the process (SIGABRT).
        if not engine.shutdown():
            logging.getLogger("corral.server").error(
                "the engine thread did not stop; exiting without interpreter cleanup")
            sys.stderr.flush()
            os._exit(1)
    return 0


def _stop_when_engine_fails(engine, server, interval: float = 0.5) -> None:
    """Tensor parallelism: a lost rank cannot be replaced in place, so end the server (a
    supervisor restarts it) rather than answer 503 forever. /health says why meanwhile."""
    import time

    while not server.should_exit:
        reason = engine.error
        if reason is not None:
            logging.getLogger("corral.server").error("stopping the server: %s", reason)
            server.should_exit = True
            return
        time.sleep(interval)


def _setup_logging() -> None:
    # The per-request JSON lines go to stderr as they are (one object per line).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("corral.server")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    # the engine's warnings: a request that failed alone, or the engine thread dying
    engine_log = logging.getLogger("corral.engine")
    engine_log.addHandler(handler)
    engine_log.setLevel(logging.WARNING)
    engine_log.propagate = False
