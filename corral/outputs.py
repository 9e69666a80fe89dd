"""What the engine returns: vLLM-shaped outputs, plus the deltas a stream needs."""

from __future__ import annotations

from dataclasses import dataclass

# One position's log-probabilities: {token_id: logprob}; the chosen token is always present.
Logprobs = dict[int, float]


class CompletionOutput:
    """One sample (of `n`) for a request. `text`/`token_ids`/`logprobs` are cumulative;
    `delta_*` hold what is new since the previous streamed update.

    The engine builds one per sample every step it changes, so it must not copy the whole
    history each time (that made a stream quadratic in its length): `CompletionOutput.view`
    keeps references to the sequence's append-only token and logprob lists and its text, with
    the lengths at this step, and the cumulative fields are sliced out on first read.
    """

    __slots__ = (
        "_logprobs",
        "_text",
        "_token_ids",
        "_view",
        "delta_logprobs",
        "delta_text",
        "delta_token_ids",
        "finish_reason",
        "index",
        "stop_reason",
    )

    def __init__(self, index: int, text: str = "", token_ids: list[int] | None = None,
                 logprobs: list[Logprobs] | None = None, finish_reason: str | None = None,
                 stop_reason: str | int | None = None, delta_text: str = "",
                 delta_token_ids: list[int] | None = None,
                 delta_logprobs: list[Logprobs] | None = None):
        self.index = index
        self._text = text
        self._token_ids = [] if token_ids is None else token_ids
        self._logprobs = logprobs
        self.finish_reason = finish_reason  # "stop" | "length" | "abort" | "error"
        self.stop_reason = stop_reason  # the stop string or token id that ended it
        self.delta_text = delta_text
        self.delta_token_ids = [] if delta_token_ids is None else delta_token_ids
        self.delta_logprobs = delta_logprobs
        self._view = None

    @classmethod
    def view(cls, index: int, text: str, text_end: int, ids: list[int], ids_start: int,
             ids_end: int, logprobs: list[Logprobs] | None, delta_start: int,
             text_start: int, finish_reason: str | None,
             stop_reason: str | int | None) -> CompletionOutput:
        """An output over `ids[ids_start:ids_end]`, `text[:text_end]` and
        `logprobs[:ids_end - ids_start]` (lists that only ever grow; `text` is immutable),
        whose deltas start at output token `delta_start` and character `text_start`."""
        out = cls.__new__(cls)
        out.index, out.finish_reason, out.stop_reason = index, finish_reason, stop_reason
        out.delta_text = text[text_start:text_end]
        out.delta_token_ids = ids[ids_start + delta_start:ids_end]
        n = ids_end - ids_start
        out.delta_logprobs = logprobs[delta_start:n] if logprobs is not None else None
        out._view = (text, text_end, ids, ids_start, ids_end, logprobs)
        return out

    def _materialize(self) -> None:
        text, text_end, ids, start, end, lps = self._view
        self._text = text[:text_end]
        self._token_ids = ids[start:end]
        self._logprobs = lps[:end - start] if lps is not None else None
        self._view = None

    @property
    def text(self) -> str:
        if self._view is not None:
            self._materialize()
        return self._text

    @text.setter
    def text(self, value: str) -> None:
        if self._view is not None:
            self._materialize()
        self._text = value

    @property
    def token_ids(self) -> list[int]:
        if self._view is not None:
            self._materialize()
        return self._token_ids

    @token_ids.setter
    def token_ids(self, value: list[int]) -> None:
        if self._view is not None:
            self._materialize()
        self._token_ids = value

    @property
    def logprobs(self) -> list[Logprobs] | None:
        if self._view is not None:
            self._materialize()
        return self._logprobs

    @logprobs.setter
    def logprobs(self, value: list[Logprobs] | None) -> None:
        if self._view is not None:
            self._materialize()
        self._logprobs = value

    @property
    def num_tokens(self) -> int:
        """len(token_ids), without materializing them."""
        if self._view is not None:
            return self._view[4] - self._view[3]
        return len(self._token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _fields(self) -> tuple:
        return (self.index, self.text, self.token_ids, self.logprobs, self.finish_reason,
                self.stop_reason, self.delta_text, self.delta_token_ids, self.delta_logprobs)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompletionOutput):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # mutable, like the dataclass it replaces

    def __reduce__(self):  # pickle / copy the values, not the sequence's whole lists
        return (CompletionOutput, self._fields())

    def __repr__(self) -> str:
        names = ("index", "text", "token_ids", "logprobs", "finish_reason", "stop_reason",
                 "delta_text", "delta_token_ids", "delta_logprobs")
        body = ", ".join(f"{k}={v!r}" for k, v in zip(names, self._fields()))
        return f"CompletionOutput({body})"


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0


@dataclass
class RequestOutput:
    """A request's state. `.text`, `.token_ids`, `.finish_reason` read the first sample."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[Logprobs | None] | None = None
    metrics: RequestMetrics | None = None
    error: str | None = None
    # the failure lies in the request's own values (a constraint no token can follow,
    # min_tokens and stop tokens leaving none, an unusable temperature): a client error
    error_by_request: bool = False

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
