"""Admission control: at most N requests in the engine, a bounded FIFO queue behind them.

A request that finds both full is refused at once (429) rather than left hanging; once the
server starts draining for shutdown every new request is refused with 503.
"""

from __future__ import annotations

import asyncio
from collections import deque

from corral.server.errors import ApiError


class Admission:
    """Bounded concurrency + bounded queue. `acquire()` then exactly one `release()`."""

    def __init__(self, max_running: int, max_queue: int):
        self.max_running, self.max_queue = max_running, max_queue
        self.running = 0
        self.draining = False
        self._waiters: deque[asyncio.Future] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, wait in the queue for one, or raise ApiError(429/503) immediately."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if self.running < self.max_running and not self._waiters:
            self.running += 1
            return
        if len(self._waiters) >= self.max_queue:
            raise ApiError(429, f"the server is busy ({self.running} running, {self.queued} "
                                "queued); retry later", code="queue_full")
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut  # release() hands its slot over by resolving this future
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release()  # we were handed a slot but will not use it
            elif fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def fail_waiters(self, err: Exception) -> int:
        """Refuse every queued request with `err` (the drain timed out); returns how many."""
        failed = 0
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(err)
                failed += 1
        return failed

    def release(self) -> None:
        """Give the slot to the oldest waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.running -= 1
