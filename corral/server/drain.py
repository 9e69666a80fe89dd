"""Graceful shutdown for `corral serve`: drain on SIGTERM/SIGINT with the listener still open.

uvicorn's own handling closes the listening socket at the first signal (a load balancer then
sees refused connections, never "draining") and, past its timeout, cancels the handlers (the
client gets a bare 500 or a cut stream). Here the first signal only flips the server to
draining: `/health` answers 503 {"status": "draining"}, new requests 503 with Retry-After,
and requests already running or queued go on. Once they have all ended, or `drain_timeout`
has passed (a second signal ends the wait at once), the rest are failed with a proper error
(a JSON 503, or an error event on a stream that has begun), and only then does uvicorn stop.
"""

from __future__ import annotations

import logging
import time

import uvicorn

from corral.server.errors import ApiError

log = logging.getLogger("corral.server")

FLUSH_SECONDS = 5.0  # after failing the stragglers, how long their error responses may take
SHUTDOWN_REASON = "the server shut down before this request finished"


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the drain above; `serving` is the app's corral Serving."""

    def __init__(self, config: uvicorn.Config, serving, drain_timeout: float):
        super().__init__(config)
        self.serving, self.drain_timeout = serving, drain_timeout
        self.drain_started: float | None = None
        self.deadline = float("inf")
        self.failed_at: float | None = None
        self.signals = 0

    def handle_exit(self, sig, frame) -> None:
        # Runs in the main thread between two bytecodes of the event loop: only set flags.
        # Nothing is appended to _captured_signals, so uvicorn does not re-raise the signal
        # after shutdown: a finished drain exits 0.
        self.signals += 1
        now = time.monotonic()
        if self.signals == 1:
            self.drain_started = now
            self.deadline = now + self.drain_timeout
            self.serving.admission.draining = True
        elif self.signals == 2:
            self.deadline = now  # stop waiting for in-flight requests
        else:
            self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.drain_started is None:
            return False
        adm, now = self.serving.admission, time.monotonic()
        if counter % 10 == 0 and self.failed_at is None:
            log.info("draining: %d running, %d queued", adm.running, adm.queued)
        if adm.running == 0 and adm.queued == 0:
            return True
        if self.failed_at is None and now >= self.deadline:
            self.failed_at = now
            queued = adm.fail_waiters(ApiError(503, SHUTDOWN_REASON, code="shutting_down"))
            running = self.serving.engine.abort_all(SHUTDOWN_REASON)
            log.warning("drain timeout (%.1f s): failing %d running and %d queued requests",
                        self.drain_timeout, running, queued)
        return self.failed_at is not None and now >= self.failed_at + FLUSH_SECONDS
