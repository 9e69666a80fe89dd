"""Server-sent events: one `data:` line per event, and a response that always closes its
stream, so a client that goes away mid-answer aborts the engine request at once."""

from __future__ import annotations

import json
import logging

from starlette.responses import StreamingResponse

from corral.server.errors import OPENAI_TYPES, TGI_PATHS, TGI_TYPES, ApiError

log = logging.getLogger("corral.server")


# Characters that str.splitlines() (and so httpx's iter_lines, a common SSE reader) takes for
# line ends although SSE does not, and json.dumps leaves raw (it escapes those below U+0020):
# escaped, generated text never splits an event.
_LINE_ENDS = str.maketrans({c: f"\\u{ord(c):04x}" for c in "\x85\u2028\u2029"})


def sse(obj: dict, prefix: str = "data: ") -> str:
    """One event: `obj` as UTF-8 JSON on one line, whatever its strings hold."""
    text = json.dumps(obj, ensure_ascii=False)
    if not text.isascii():  # O(1); most events are ASCII and need no translation
        text = text.translate(_LINE_ENDS)
    return f"{prefix}{text}\n\n"


def error_event(path: str, err: ApiError) -> str:
    """The event that ends a stream which failed after it began (headers already sent): TGI's
    `{"error", "error_type"}` on TGI paths, else OpenAI's error object and `[DONE]` (the
    `openai` client raises APIError on it)."""
    if path in TGI_PATHS:
        return sse({"error": err.message, "error_type": TGI_TYPES.get(err.status, "generation")},
                   prefix="data:")
    body = {"message": err.message, "type": OPENAI_TYPES.get(err.status, "server_error"),
            "param": err.param, "code": err.code}
    return sse({"error": body}) + "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    """A text/event-stream response whose body iterator is closed however the send ends.

    Starlette cancels the sending task on disconnect, which can leave the iterator suspended
    at a `yield`; closing it here runs its cleanup (engine abort, admission release) now
    rather than whenever the garbage collector finds it. An error raised by the events after
    the stream began becomes a final error event instead of a cut connection.
    """

    def __init__(self, events):
        self._events, self._path = events, ""
        super().__init__(self._guarded(), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _guarded(self):
        try:
            async for chunk in self._events:
                yield chunk
        except ApiError as e:
            yield error_event(self._path, e)
        except Exception as e:  # a bug: still end the stream in the protocol
            log.exception("stream failed")
            yield error_event(self._path, ApiError(500, f"internal error: {e}"))

    async def __call__(self, scope, receive, send) -> None:
        self._path = scope.get("path", "")
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            aclose = getattr(self._events, "aclose", None)
            if aclose is not None:  # _guarded leaves it suspended when the send was cut
                await aclose()
