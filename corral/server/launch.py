"""Start `corral serve` in a subprocess on a free port and wait until it is healthy.

Used by the end-to-end tests and `benchmarks/serve_load.py`, which both need the real server
as a user runs it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx

from corral.errors import CorralError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`with ServerProcess(["--model", "default"]) as srv: httpx.get(srv.url + "/health")`."""

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args, self.timeout = args, timeout
        self.env = {**os.environ, **(env or {})}
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the server
            "w+", prefix="corral-serve-", suffix=".log")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ServerProcess:  # noqa: PYI034
        cmd = [sys.executable, "-m", "corral.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=self.env)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise CorralError(f"corral serve exited with {self.proc.returncode}:\n"
                                  f"{self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise CorralError(f"corral serve was not healthy after {self.timeout:.0f}s")

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name) as f:
            return f.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        """Send `sig` and wait for the exit code (kill after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
