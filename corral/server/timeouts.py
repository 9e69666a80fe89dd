"""uvicorn's h11 protocol with a header read timeout.

uvicorn closes an idle keep-alive connection after `timeout_keep_alive`, but only once a
response has been sent: a connection that never sends (or never finishes) its request headers
stays open forever, so a few hundred half-open sockets exhaust the server. This protocol
closes a connection whose request headers have not arrived `header_timeout` seconds after it
opened or after its previous response.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def h11_with_header_timeout(header_timeout: float) -> type[H11Protocol]:
    """An H11Protocol class (uvicorn.Config(http=...)) with `header_timeout` seconds."""

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            # their_state leaves IDLE once a request's headers have been parsed
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            self._arm()  # the next request's headers are due (pipelined ones disarm it)
            super().on_response_complete()

    return HeaderTimeoutH11
