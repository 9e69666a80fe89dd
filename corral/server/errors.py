"""HTTP errors in the shape each client family expects.

OpenAI clients read `{"error": {"message", "type", "param", "code"}}`; TGI clients read
`{"error": str, "error_type": str}`. Routes raise `ApiError`; the app renders it by path.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

# status -> OpenAI error type
OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable", 500: "server_error"}
# status -> TGI error_type (TGI answers validation problems with 422)
TGI_TYPES = {400: "validation", 413: "validation", 422: "validation", 429: "overloaded",
             503: "overloaded", 500: "generation"}


class ApiError(Exception):
    """A request the server answers with `status` and a one-line `message`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


# seconds a client should wait: a queue slot frees within a request; a restart takes longer
RETRY_AFTER = {429: "1", 503: "5"}
TGI_PATHS = frozenset({"/", "/generate", "/generate_stream", "/info"})


def error_response(path: str, err: ApiError, headers: dict | None = None) -> JSONResponse:
    """Render `err` for the client family that owns `path`. 429 and 503 say when to retry."""
    if err.status in RETRY_AFTER:
        headers = {"Retry-After": RETRY_AFTER[err.status], **(headers or {})}
    if path in TGI_PATHS:
        status = 422 if err.status == 400 else err.status
        body = {"error": err.message, "error_type": TGI_TYPES.get(status, "generation")}
        return JSONResponse(body, status_code=status, headers=headers)
    body = {"error": {"message": err.message, "type": OPENAI_TYPES.get(err.status, "server_error"),
                      "param": err.param, "code": err.code}}
    return JSONResponse(body, status_code=err.status, headers=headers)
