"""The one exception type front ends turn into a one-line message (CLI) or a 4xx (server)."""


class CorralError(Exception):
    """A user-facing problem: bad input, a missing file, an unsupported model. One line."""
