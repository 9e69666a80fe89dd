"""Ray Serve app builder (corral.server.ray_app): settings and deployment options, no cluster."""

from __future__ import annotations

import pytest

from corral.errors import CorralError
from corral.server.ray_app import build, deployment, settings_from_dict


def test_builder_args_are_corral_serve_flags():
    """`serve run corral.server.ray_app:build key=value` passes strings; KubeRay's
    serveConfigV2 passes YAML values; both go through `corral serve`'s own parser."""
    s = settings_from_dict({"model": "default", "replicas": "3", "max-num-seqs": 8,
                            "num_cpus_per_replica": "2", "log_prompts": "true",
                            "strict_model_names": False, "cors_origin": ["http://a", "http://b"]})
    assert (s["model"], s["replicas"], s["max_num_seqs"]) == ("default", 3, 8)
    assert s["num_cpus_per_replica"] == 2.0 and s["log_prompts"] is True
    assert s["strict_model_names"] is False and s["cors_origins"] == ["http://a", "http://b"]
    assert s["max_concurrent_requests"] == 64  # corral serve's defaults fill the rest
    d = deployment({**s, "num_gpus_per_replica": 1.0})
    assert d.num_replicas == 3
    assert d.ray_actor_options["num_cpus"] == 2.0 and d.ray_actor_options["num_gpus"] == 1.0
    assert d.max_ongoing_requests == 64 + 256  # Corral's own queue answers 429 past that
    assert build({"model": "default"}) is not None


def test_ray_calls_the_builder_like_serve_run_does():
    """Ray's own loader for `serve run module:build k=v` and serveConfigV2 `args`."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application

    app = call_user_app_builder_with_args_if_necessary(build, {"model": "default",
                                                               "replicas": "2"})
    assert isinstance(app, Application)


def test_bad_builder_args_are_clear_errors():
    with pytest.raises(CorralError, match="invalid corral serve settings"):
        settings_from_dict({"no_such_flag": 1})
    with pytest.raises(CorralError, match="invalid corral serve settings"):
        settings_from_dict({"replicas": "two"})
    with pytest.raises(CorralError, match="at least 1"):
        build({"replicas": 0})


def test_plain_serve_is_the_default(monkeypatch):
    """--replicas 1 without --ray-address never imports Ray's path."""
    from corral.cli import build_parser

    args = build_parser("serve").parse_args(["serve"])
    assert args.replicas == 1 and args.ray_address is None
    from corral.server import ray_app

    monkeypatch.setattr(ray_app, "run_cli", lambda a: pytest.fail("Ray path taken"))
    monkeypatch.setattr("corral.AsyncLLM", _no_engine)
    with pytest.raises(_Stop):
        args.func(args)
    args = build_parser("serve").parse_args(["serve", "--replicas", "0"])
    with pytest.raises(CorralError, match="at least 1"):
        args.func(args)


class _Stop(Exception):
    pass


def _no_engine(*args, **kwargs):
    raise _Stop("the plain server's engine construction was reached")


def test_health_check_follows_the_engine_thread():
    """Ray Serve marks a replica unhealthy (and replaces it) when check_health raises: once
    the engine thread has died, as /health's 503 says."""
    from types import SimpleNamespace

    from corral.server.ray_app import CorralReplica

    replica = CorralReplica.__new__(CorralReplica)  # no model: only the check is under test
    replica.engine = SimpleNamespace(error=None)
    replica.check_health()
    replica.engine = SimpleNamespace(error="the engine stopped after an error: boom")
    with pytest.raises(RuntimeError, match="boom"):
        replica.check_health()
    replica.engine = None  # nothing to shut down when it is collected
