"""Replicas on Ray Serve: N copies of `corral serve`'s app, each with its own engine.

Each replica is a Ray actor that builds the same FastAPI app as the plain server
(`create_app(AsyncLLM(...), ServerConfig)`), handed to Ray Serve's FastAPI ingress at replica
start (`serve.ingress()` + `__serve_build_asgi_app__`), so every route, limit and error shape is
the plain server's. Ray Serve's proxy spreads requests over the replicas, calls `check_health`
(the engine thread's `error`) and replaces a replica that fails it or whose process dies.

Two ways in:
- `corral serve --replicas N [--ray-address ADDR]`: `run_cli` starts (or joins) a cluster,
  deploys, and serves until SIGINT/SIGTERM.
- Ray's app-builder convention, for `serve run` and KubeRay's `serveConfigV2`:
  `import_path: corral.server.ray_app:build` with `args:` holding `corral serve`'s flags
  (underscored or dashed names, e.g. `model: default`, `replicas: 2`, `max_num_seqs: 16`).

Every response carries `x-corral-replica` (Ray's replica id); `GET /replica` says which replica
and process answered (id, pid, node), so a client or test can tell the replicas apart.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from corral.errors import CorralError

try:
    import ray
    from ray import serve
except ImportError:  # the `scale` extra is optional
    ray = serve = None

log = logging.getLogger("corral.server")

APP_NAME = "corral"
REPLICA_HEADER = b"x-corral-replica"
HEALTH_CHECK_PERIOD_S = 5.0  # how often Ray Serve asks each replica's engine if it is alive
HEALTH_CHECK_TIMEOUT_S = 30.0
# Settings Ray uses for placement; the replicas themselves ignore them.
RAY_ONLY = ("replicas", "ray_address", "num_cpus_per_replica", "num_gpus_per_replica")


def require_ray() -> None:
    if serve is None:
        raise CorralError("replicas on Ray Serve need Ray: pip install 'corral[scale]' "
                          "(ray[serve]==2.60.0)")


def serve_parser() -> argparse.ArgumentParser:
    """`corral serve`'s own parser (the one source of flag names, types and defaults)."""
    from corral.server.cli import register

    parser = argparse.ArgumentParser(prog="corral")
    register(parser.add_subparsers(dest="command"))
    return parser


def settings_from_dict(args: dict) -> dict:
    """`corral serve` settings from a builder's `args` mapping (values may be strings, as
    `serve run module:build key=value` passes them): turned into flags and parsed by
    `corral serve`'s parser, so an unknown key or a bad value is the same error as on the
    command line."""
    argv: list[str] = []
    for key, value in (args or {}).items():
        flag = "--" + str(key).replace("_", "-")
        if value is True or (isinstance(value, str) and value.lower() == "true"):
            argv.append(flag)
        elif value is False or value is None or (isinstance(value, str)
                                                 and value.lower() == "false"):
            continue
        elif isinstance(value, (list, tuple)):
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    parser = serve_parser()
    try:
        ns = parser.parse_args(["serve", *argv])
    except SystemExit:  # argparse already printed why
        raise CorralError(f"invalid corral serve settings: {args}") from None
    return namespace_settings(ns)


def namespace_settings(ns: argparse.Namespace) -> dict:
    """A parsed `corral serve` namespace as a plain dict a Ray actor can receive."""
    return {k: v for k, v in vars(ns).items() if k not in ("func", "command")}


class CorralReplica:
    """One engine and the plain server's app around it (wrapped by `deployment()` below)."""

    def __init__(self, settings: dict):
        from corral import AsyncLLM
        from corral.server.cli import _setup_logging, config_from_args, engine_kwargs_from_args

        args = argparse.Namespace(**settings)
        self.config = config_from_args(args)
        _setup_logging()
        self.engine = AsyncLLM(model=args.model, **engine_kwargs_from_args(args))
        ctx = serve.get_replica_context()
        self.replica_id = ctx.replica_id.unique_id
        self.identity = {"replica": self.replica_id, "deployment": ctx.deployment,
                         "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id()}
        log.info("corral replica %s (pid %d) serving %s", self.replica_id, os.getpid(),
                 args.model)

    def __serve_build_asgi_app__(self):
        """Called by Ray Serve after __init__: the plain server's app, plus the replica id."""
        from corral.server.app import create_app

        app = create_app(self.engine, self.config)
        identity = self.identity

        @app.get("/replica")
        async def replica():
            """Which replica and process answered (Ray Serve spreads requests over them)."""
            return identity

        app.add_middleware(ReplicaHeader, replica=self.replica_id)
        return app

    def check_health(self) -> None:
        """Ray Serve calls this every HEALTH_CHECK_PERIOD_S; raising marks the replica
        unhealthy, and Ray replaces it with a fresh one."""
        error = self.engine.error
        if error:
            raise RuntimeError(error)

    def __del__(self):
        # Join the engine thread between two steps (see `corral serve`'s shutdown).
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout=30)


class ReplicaHeader:
    """ASGI middleware: `x-corral-replica: <id>` on every response."""

    def __init__(self, app, replica: str):
        self.app, self.value = app, replica.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((REPLICA_HEADER, self.value))
            await send(message)

        await self.app(scope, receive, send_tagged)


def deployment(settings: dict):
    """The Ray Serve deployment for `settings` (replica count and resources from them)."""
    require_ray()
    if settings.get("replicas", 1) < 1:
        raise CorralError(f"--replicas must be at least 1, got {settings.get('replicas')}")
    ingress = serve.ingress()(CorralReplica)
    actor = {"num_cpus": settings.get("num_cpus_per_replica", 1.0),
             "num_gpus": settings.get("num_gpus_per_replica", 0.0)}
    # Corral's own admission queue stays in charge per replica (429 past --max-queue), so
    # Ray may hand each replica as many requests as it would accept.
    ongoing = settings.get("max_concurrent_requests", 64) + settings.get("max_queue", 256)
    return serve.deployment(
        ingress, name="CorralReplica", num_replicas=settings.get("replicas", 1),
        ray_actor_options=actor, max_ongoing_requests=ongoing,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        graceful_shutdown_timeout_s=settings.get("drain_timeout", 30.0))


def build(args: dict):
    """Ray Serve app builder (`serve run corral.server.ray_app:build model=default
    replicas=2`, or KubeRay's serveConfigV2 `import_path`)."""
    settings = settings_from_dict(args)
    return deployment(settings).bind(settings)


def run_cli(args: argparse.Namespace) -> int:
    """`corral serve --replicas N`: start or join Ray, deploy, serve until SIGINT/SIGTERM."""
    require_ray()
    settings = namespace_settings(args)
    app = deployment(settings).bind(settings)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no phoning home from a server
    stop = threading.Event()

    def on_signal(sig, frame):
        stop.set()

    own_cluster = not args.ray_address
    if args.num_cpus_per_replica < 0 or args.num_gpus_per_replica < 0:
        raise CorralError("--num-cpus-per-replica and --num-gpus-per-replica must be >= 0")
    if own_cluster and args.num_gpus_per_replica:
        import torch

        have, need = torch.cuda.device_count(), args.replicas * args.num_gpus_per_replica
        if need > have:  # Ray would wait for them forever
            raise CorralError(f"{args.replicas} replicas x --num-gpus-per-replica "
                              f"{args.num_gpus_per_replica:g} need {need:g} GPUs; this machine "
                              f"has {have} (join a larger cluster with --ray-address)")
    if own_cluster:
        need = args.replicas * args.num_cpus_per_replica
        # Ray's CPUs are logical: reserve what the replicas ask for even on a small machine.
        # address="local": always a new cluster, never one `ray start` left on this machine
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, int(need + 0.999)),
                 num_gpus=None if args.num_gpus_per_replica else 0,
                 include_dashboard=False, object_store_memory=100 * 1024 * 1024)
    else:
        ray.init(address=args.ray_address)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        t0 = time.perf_counter()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except RuntimeError as e:  # Ray gave up on the replicas (their errors are logged above)
            raise CorralError(f"the replicas did not start (their errors are above): "
                              f"{_last_line(e)}") from None
        print(f"corral serve: {args.replicas} replica(s) of {args.model} on Ray Serve, "
              f"http://{args.host}:{args.port} (ready in {time.perf_counter() - t0:.0f} s)",
              flush=True)
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        while not stop.wait(1.0):
            pass
    finally:
        # Our own cluster goes away with us; on a shared one only our application does. A
        # signal sent to the whole process group (systemd, `timeout`) may already have ended
        # Ray's raylet, and Serve's shutdown would then wait forever: bound it, then
        # ray.shutdown() ends the processes this command started either way.
        stop_serve = serve.shutdown if own_cluster else (lambda: serve.delete(APP_NAME))
        if not _within(stop_serve, args.drain_timeout + 30.0):
            log.warning("Ray Serve did not shut down in time; stopping Ray")
        ray.shutdown()
    return 0


def _within(fn, seconds: float) -> bool:
    """Run fn in a helper thread; True if it returned within `seconds`."""
    done = threading.Event()

    def call():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - shutting down: report and go on
            log.warning("shutdown step failed: %r", e)
        finally:
            done.set()

    threading.Thread(target=call, name="corral-ray-shutdown", daemon=True).start()
    return done.wait(seconds)


def _last_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1][:500] if lines else type(e).__name__
