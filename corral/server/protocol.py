"""Request bodies (pydantic) for the OpenAI and TGI routes, and their SamplingParams.

Field names follow OpenAI's API and TGI's `GenerateParameters`; vLLM's extras (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are accepted too, so
`openai` clients can pass them through `extra_body`. Unknown fields are ignored, like OpenAI.

Validation lives here (types, finite numbers, valid Unicode, the server's caps) and in
`SamplingParams.validate` (ranges); every violation is an ApiError(400) whose `param` names the
field. An explicit `null` means the field's default (except `max_tokens` on /v1/completions,
where null means "as many as fit", as in OpenAI's API).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.sampling_params import ParamError, SamplingParams
from corral.server.constraints import ResponseFormat, StructuredOutputsBody, TGIGrammar
from corral.server.errors import ApiError
from corral.server.tools import NamedToolChoice, ToolCall, ToolDef


def check_text(value, where: str = "") -> None:
    """Raise ValueError for a string (also inside lists/dicts) that is not valid Unicode: JSON
    allows lone surrogates ("\\ud800"), which no tokenizer can encode."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it has a lone surrogate)") from None
    elif isinstance(value, (list, tuple)):
        for v in value:
            check_text(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_text(k)
            check_text(v)


class _Body(BaseModel):
    # allow_inf_nan=False: Python's json (so FastAPI) parses NaN and Infinity literals.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    _keep_null: ClassVar[frozenset[str]] = frozenset()  # fields where null is not "default"

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data):
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k in cls._keep_null}
        return data

    @field_validator("*", mode="after")
    @classmethod
    def _valid_unicode(cls, v):
        check_text(v)
        return v


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages that called tools
    tool_call_id: str | None = None  # role "tool": which call this result answers

    def text(self) -> str:
        """The message as plain text (only text content parts are supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


def _params(param_names: dict[str, str], **kw) -> SamplingParams:
    """SamplingParams(**kw); a ParamError becomes a 400 naming the request's field."""
    try:
        return SamplingParams(**kw)
    except ParamError as e:
        raise ApiError(400, str(e), param=param_names.get(e.param, e.param)) from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


class _Sampling(_Body):
    """Fields shared by chat and completions."""

    model: str = ""  # optional like vLLM; see Serving.check_model for what is accepted
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    # constrained output (corral/server/constraints.py): OpenAI's, vLLM's current and older
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsBody | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    # SamplingParams field -> this body's field, for the `param` of a 400
    _param_names: ClassVar[dict[str, str]] = {}

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_caps(self, cfg) -> None:
        """The server's caps (ServerConfig): n, stop strings and stop token ids."""
        if not 1 <= self.n <= cfg.max_n:
            raise ApiError(400, f"n must be in [1, {cfg.max_n}], got {self.n}", param="n")
        _check_stops(self.stop_list(), len(self.stop_token_ids or []), cfg)

    def sampling(self, max_tokens: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for this body; impossible values become a 400."""
        def pick(v, default):
            return default if v is None else v

        return _params(
            self._param_names,
            n=self.n, temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0),
            top_k=pick(self.top_k, 0), min_p=pick(self.min_p, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0),
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            max_tokens=max_tokens, min_tokens=self.min_tokens, stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _check_stops(stop: list[str], n_stop_ids: int, cfg) -> None:
    if len(stop) > cfg.max_stop_sequences:
        raise ApiError(400, f"at most {cfg.max_stop_sequences} stop strings are allowed, got "
                            f"{len(stop)}", param="stop")
    if any(len(s) > cfg.max_stop_length for s in stop):
        raise ApiError(400, f"stop strings must be at most {cfg.max_stop_length} characters",
                       param="stop")
    if n_stop_ids > cfg.max_stop_sequences:
        raise ApiError(400, f"at most {cfg.max_stop_sequences} stop_token_ids are allowed, got "
                            f"{n_stop_ids}", param="stop_token_ids")


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    _param_names: ClassVar[dict[str, str]] = {"logprobs": "top_logprobs"}

    @property
    def max_tokens_param(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    @property
    def requested_max_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's current name) wins over max_tokens."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    _keep_null: ClassVar[frozenset[str]] = frozenset({"max_tokens"})
    max_tokens_param: ClassVar[str] = "max_tokens"


class TGIParameters(_Body):
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    do_sample: bool = False
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool = False
    best_of: int | None = None
    truncate: int | None = None
    top_n_tokens: int | None = None
    watermark: bool = False
    grammar: TGIGrammar | None = None
    lora: str | None = Field(default=None, validation_alias=AliasChoices("lora", "adapter_id"))


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False  # only read by `POST /`

    _param_names: ClassVar[dict[str, str]] = {"logprobs": "top_n_tokens",
                                              "max_tokens": "max_new_tokens"}

    def check_caps(self, cfg) -> None:
        p = self.parameters
        _check_stops(p.stop, 0, cfg)
        if p.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")
        if p.watermark:
            raise ApiError(400, "watermark is not supported", param="watermark")
        if p.typical_p is not None and not 0 < p.typical_p <= 1:
            raise ApiError(400, f"typical_p must be in (0, 1], got {p.typical_p}",
                           param="typical_p")
        if p.truncate is not None and p.truncate < 1:
            raise ApiError(400, f"truncate must be at least 1, got {p.truncate}",
                           param="truncate")

    def sampling(self, max_tokens: int) -> SamplingParams:
        p = self.parameters
        # TGI samples when asked to or when any sampling knob is set; otherwise greedy.
        sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        if p.temperature is not None and p.temperature <= 0:
            raise ApiError(400, "`temperature` must be strictly positive", param="temperature")
        return _params(
            self._param_names,
            temperature=(1.0 if p.temperature is None else p.temperature) if sample else 0.0,
            top_k=p.top_k or 0, top_p=1.0 if p.top_p is None else p.top_p,
            repetition_penalty=1.0 if p.repetition_penalty is None else p.repetition_penalty,
            frequency_penalty=p.frequency_penalty or 0.0, max_tokens=max_tokens,
            stop=p.stop, seed=p.seed, logprobs=p.top_n_tokens or 0,
            prompt_logprobs=0 if p.decoder_input_details else None)
