"""`corral ui`: serve the Gradio chat page for a local model or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import gc
import os

from corral.cli_args import (
    add_chat_format_arg,
    add_device_arg,
    add_dtype_arg,
    check_chat_format,
)
from corral.errors import CorralError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ui",
        help="chat with a model in the browser (Gradio)",
        description="Serve a browser chat page with streaming answers, a system prompt and "
        "sampling controls. Runs the model in-process (--model) or talks to any "
        "OpenAI-compatible server such as `corral serve` (--endpoint).",
    )
    p.add_argument("--model", default=None,
                   help="model to run locally (alias, HF folder, .gguf, hub id; default: "
                   "'default'); with --endpoint, the model name to ask the endpoint for")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--api-key", default=None, help="bearer token for --endpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    add_dtype_arg(p, help="local model dtype (auto: float32 on CPU, bfloat16 on CUDA)")
    add_device_arg(p)
    add_chat_format_arg(p)
    p.add_argument("--max-new-tokens", type=int, default=2048,
                   help="upper end of the 'Max new tokens' slider")
    from corral.cli_args import add_lora_args

    add_lora_args(p)
    p.set_defaults(func=run_ui)


def make_backend(args: argparse.Namespace):
    """The local engine or the endpoint client the arguments ask for."""
    from corral.ui.backends import EndpointBackend, LocalBackend

    if args.endpoint:
        if not args.endpoint.startswith(("http://", "https://")):
            raise CorralError(f"--endpoint must be an http(s) URL, got {args.endpoint!r}")
        if getattr(args, "lora", None):
            raise CorralError("--lora applies to a local model; with --endpoint pick the "
                              "adapter by --model NAME")
        return EndpointBackend(args.endpoint, api_key=args.api_key, model=args.model)
    if args.api_key:
        raise CorralError("--api-key only applies to --endpoint")
    chat_format = getattr(args, "chat_format", None)
    check_chat_format(chat_format)
    kw = {"chat_format": chat_format} if chat_format else {}
    from corral.cli_args import lora_kwargs_from_args

    kw.update(lora_kwargs_from_args(args))
    if kw.get("lora_modules"):  # the chat answers under the first adapter
        kw["default_lora"] = next(iter(kw["lora_modules"]))
    return LocalBackend.load(args.model or "default", dtype=args.dtype, device=args.device, **kw)


def build_server(backend, max_new_tokens: int = 2048):
    """A FastAPI app with the chat page at / and a small JSON status route."""
    import gradio as gr
    from fastapi import FastAPI

    from corral.ui.app import THEME, build_app

    app = FastAPI(title="corral ui")

    @app.get("/corral/status")
    def status() -> dict:
        """Model info and, for a local engine, how many requests are running (0 = idle)."""
        stats = backend.stats() if hasattr(backend, "stats") else {}
        return {"model": backend.info(), **stats}

    demo = build_app(backend, max_new_tokens=max_new_tokens)
    return gr.mount_gradio_app(app, demo, path="/", theme=THEME, ssr_mode=False,
                               footer_links=[], show_error=False)


def run_ui(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise CorralError(f"--port must be between 1 and 65535, got {args.port}")
    if args.max_new_tokens < 1:
        raise CorralError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    # No phoning home: the page must work on a closed network.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import uvicorn

    backend = make_backend(args)
    app = build_server(backend, args.max_new_tokens)
    # As `corral serve` does: the model's and Gradio's objects live as long as the page, so
    # out of every later collection (a full one took ~0.2 s here, every stream waiting).
    gc.freeze()
    print(f"corral ui: open http://{args.host}:{args.port}/", flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        shutdown = getattr(getattr(backend, "engine", None), "shutdown", None)
        if shutdown:
            shutdown()
    return 0
