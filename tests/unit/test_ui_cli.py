"""`corral ui` argument handling and the server it builds (page + status route)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from corral.cli import main
from corral.ui.cli import build_server


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ui", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--model", "--endpoint", "--api-key", "--host", "--port"):
        assert flag in out


@pytest.mark.parametrize("argv, message", [
    (["ui", "--endpoint", "localhost:8000"], "--endpoint must be an http(s) URL"),
    (["ui", "--port", "70000"], "--port must be between 1 and 65535"),
    (["ui", "--api-key", "k"], "--api-key only applies to --endpoint"),
    (["ui", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"corral ui: error: {message}" or message in err
    assert "Traceback" not in err and err.count("\n") == 1


class IdleBackend:
    def info(self):
        return {"name": "idle-model", "max_model_len": 64}

    def stats(self):
        return {"num_running": 0, "num_waiting": 0}

    async def stream_chat(self, messages, params):
        yield "ok"


def test_server_serves_the_page_and_status():
    client = TestClient(build_server(IdleBackend()))
    status = client.get("/corral/status").json()
    assert status == {"model": {"name": "idle-model", "max_model_len": 64},
                      "num_running": 0, "num_waiting": 0}
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text
    # No web fonts or stylesheets from the internet: the page must render offline.
    config = client.get("/config").json()
    assert config["stylesheets"] == [] and config["analytics_enabled"] is False
    assert "@import" not in client.get("/theme.css").text
