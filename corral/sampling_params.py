"""Sampling parameters, with vLLM's field names so code moves between the two unchanged."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from corral.engine.structured import StructuredOutput

MAX_INT = 2**31 - 1  # counts (n, top_k, max/min tokens): a C int, so torch never overflows
MAX_SEED = 2**64 - 1
MAX_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MIN_TEMPERATURE = 1e-5  # below this (but > 0): greedy
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0


class ParamError(ValueError):
    """An impossible sampling value; `param` names the field (the server's 400 `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _num(p, name: str, low: float, high: float, low_open: bool = False) -> None:
    v = getattr(p, name)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ParamError(name, f"{name} must be a finite number, got {v!r}")
    if v > high or v < low or (low_open and v == low):
        bracket = "(" if low_open else "["
        raise ParamError(name, f"{name} must be in {bracket}{low:g}, {high:g}], got {v!r}")


def _int(p, name: str, low: int, high: int) -> None:
    v = getattr(p, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ParamError(name, f"{name} must be an integer, got {v!r}")
    if not low <= v <= high:
        raise ParamError(name, f"{name} must be in [{low}, {high}], got {v}")


@dataclass
class SamplingParams:
    """How to pick tokens for one request.

    temperature 0 means greedy (0 < temperature < 1e-5 too). top_k 0 or -1, top_p == 1 and
    min_p == 0 disable those filters.
    repetition_penalty follows the CTRL / `transformers` rule (divide positive logits, multiply
    negative ones) over prompt and output tokens; presence/frequency penalties follow OpenAI's
    rule over output tokens only.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-n logprobs per generated token (0 = only the chosen one)
    prompt_logprobs: int | None = None  # same, for prompt tokens (OpenAI `echo` + `logprobs`)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (benchmarks), no text or stop strings
    structured: StructuredOutput | None = None  # constrained decoding (JSON schema, regex, ...)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()
        # Like vLLM: a temperature this small only overflows the logits (1e-40 -> inf -> NaN
        # probabilities); it means greedy.
        if 0 < self.temperature < MIN_TEMPERATURE:
            self.temperature = 0.0

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ParamError (a ValueError naming the field) for an impossible setting.

        Numbers must be finite and within the ranges below (documented in docs/serve.md);
        with `vocab_size`, stop_token_ids must be token ids of that vocabulary.
        """
        _int(self, "n", 1, MAX_INT)
        _num(self, "temperature", 0.0, MAX_TEMPERATURE)
        _int(self, "top_k", -1, MAX_INT)  # -1 and 0 turn it off
        _num(self, "top_p", 0.0, 1.0, low_open=True)
        _num(self, "min_p", 0.0, 1.0)
        _num(self, "repetition_penalty", MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY)
        _num(self, "presence_penalty", -2.0, 2.0)
        _num(self, "frequency_penalty", -2.0, 2.0)
        if self.max_tokens is not None:
            _int(self, "max_tokens", 1, MAX_INT)
        _int(self, "min_tokens", 0, MAX_INT)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed "
                                           f"max_tokens ({self.max_tokens})")
        if self.seed is not None:
            _int(self, "seed", 0, MAX_SEED)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _int(self, name, 0, MAX_LOGPROBS)
        for s in self.stop:
            if not isinstance(s, str):
                raise ParamError("stop", f"stop must be strings, got {s!r}")
        for t in self.stop_token_ids:
            if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (
                    vocab_size is not None and t >= vocab_size):
                top = "" if vocab_size is None else f", {vocab_size}"
                raise ParamError("stop_token_ids", f"stop_token_ids must be token ids in "
                                                   f"[0{top}), got {t!r}")
        if self.stop and not self.detokenize:
            raise ParamError("stop", "stop strings need detokenize=True")
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ParamError("structured", "structured must be a StructuredOutput")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
