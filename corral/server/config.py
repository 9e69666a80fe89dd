"""Settings for one `corral serve` process (plain data; the CLI fills it from flags)."""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.errors import CorralError


@dataclass
class ServerConfig:
    """Limits, auth and logging for the HTTP server.

    `max_input_tokens` / `max_total_tokens` default to the engine's context length (set by
    `resolve`). `max_concurrent_requests` requests run in the engine at once; up to `max_queue`
    more wait their turn; past that a request is answered 429 at once.
    """

    model_name: str = "default"  # the name clients send as `model` (also accepted: engine's)
    host: str = "127.0.0.1"
    port: int = 8000
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_concurrent_requests: int = 64
    max_queue: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    log_prompts: bool = False
    # Per-request caps (reported by /info; a request over one gets a 400 naming the field).
    max_n: int = 16
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_stop_sequences: int = 16  # stop strings, and separately stop_token_ids
    max_stop_length: int = 256  # characters per stop string
    # False: like TGI, any `model` is served when only one model is (see Serving.check_model).
    strict_model_names: bool = False
    header_timeout: float = 10.0  # seconds for a connection to send its request headers
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    tool_parser: str | None = None  # "hermes" | "llama3_json"; None: from the chat format

    def resolve(self, max_model_len: int) -> ServerConfig:
        """Fill unset token limits from the model's context length and check them."""
        total = self.max_total_tokens or max_model_len
        inp = self.max_input_tokens or total - 1
        if total > max_model_len:
            raise CorralError(f"--max-total-tokens {total} exceeds the model's context "
                              f"length {max_model_len}")
        if not 0 < inp < total:
            raise CorralError(f"--max-input-tokens must be in [1, {total - 1}], got {inp}")
        if self.max_concurrent_requests < 1:
            raise CorralError("--max-concurrent-requests must be at least 1")
        if self.max_queue < 0:
            raise CorralError("--max-queue must be >= 0")
        for name in ("max_n", "max_prompts", "max_stop_sequences", "max_stop_length"):
            if getattr(self, name) < 1:
                raise CorralError(f"--{name.replace('_', '-')} must be at least 1")
        if self.header_timeout <= 0 or self.keep_alive_timeout <= 0:
            raise CorralError("--header-timeout and --keep-alive-timeout must be > 0")
        if self.tool_parser is not None and self.tool_parser not in ("hermes", "llama3_json"):
            raise CorralError(f"--tool-parser must be hermes or llama3_json, "
                              f"got {self.tool_parser!r}")
        self.max_total_tokens, self.max_input_tokens = total, inp
        return self
