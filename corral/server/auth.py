"""Bearer-token check (constant-time). `/health` stays open so load balancers can probe it."""

from __future__ import annotations

import hmac

OPEN_PATHS = frozenset({"/health"})


def bearer_ok(expected: str | None, headers: dict[str, str], path: str) -> bool:
    """True when no key is configured, the path is open, or the Bearer token matches."""
    if not expected or path in OPEN_PATHS:
        return True
    auth = headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    # x-api-key is what some OpenAI-compatible clients send instead of Authorization.
    if scheme.lower() != "bearer":
        token = headers.get("x-api-key", "")
    return hmac.compare_digest(token.strip().encode(), expected.encode())
