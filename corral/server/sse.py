"""Server-sent events: one `data:` line per event, and a response that always closes its
stream, so a client that goes away mid-answer aborts the engine request at once."""

from __future__ import annotations

import json

from starlette.responses import StreamingResponse


def sse(obj: dict, prefix: str = "data: ") -> str:
    return f"{prefix}{json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is closed however the send ends.

    Starlette cancels the sending task on disconnect, which can leave the iterator suspended
    at a `yield`; closing it here runs its cleanup (engine abort, admission release) now
    rather than whenever the garbage collector finds it.
    """

    def __init__(self, events):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
