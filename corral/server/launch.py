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

    def __init__(self, args: list[str], env: dict | None = None, timeout: float = 180.0,
                 new_session: bool = False):
        """`new_session`: run the server in its own process group, and once it has exited kill
        whatever is left in that group (`--replicas`: the local Ray cluster it started)."""
        self.new_session = new_session
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
                                     env=self.env, start_new_session=self.new_session)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reap_group()
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
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        finally:
            self._reap_group()

    def _reap_group(self) -> None:
        if self.new_session and self.proc is not None:
            try:  # the group id is the server's pid; nothing left in it is ours to keep
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
