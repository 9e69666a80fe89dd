"""Request bodies (pydantic) for the OpenAI and TGI routes, and their SamplingParams.

Field names follow OpenAI's API and TGI's `GenerateParameters`; vLLM's extras (top_k, min_p,
repetition_penalty, ignore_eos, min_tokens, stop_token_ids) are accepted too, so
`openai` clients can pass them through `extra_body`. Unknown fields are ignored, like OpenAI.
"""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from corral.sampling_params import SamplingParams
from corral.server.errors import ApiError


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message as plain text (only text content parts are supported)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        if any(p.type != "text" for p in self.content):
            raise ApiError(400, "only text content parts are supported", param="messages")
        return "".join(p.text or "" for p in self.content)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields shared by chat and completions."""

    model: str
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

    def sampling(self, max_tokens: int, logprobs: int | None = None,
                 prompt_logprobs: int | None = None) -> SamplingParams:
        """SamplingParams for this body; impossible values become a 400."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            return SamplingParams(
                n=self.n, temperature=1.0 if self.temperature is None else self.temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                min_p=self.min_p or 0.0, repetition_penalty=self.repetition_penalty or 1.0,
                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                max_tokens=max_tokens, min_tokens=self.min_tokens, stop=stop,
                stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                seed=self.seed, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


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
    lora: str | None = Field(default=None, validation_alias=AliasChoices("lora", "adapter_id"))


class TGIRequest(_Body):
    inputs: str
    parameters: TGIParameters = Field(default_factory=TGIParameters)
    stream: bool = False  # only read by `POST /`

    def sampling(self, max_tokens: int) -> SamplingParams:
        p = self.parameters
        # TGI samples when asked to or when any sampling knob is set; otherwise greedy.
        sample = p.do_sample or any(v is not None for v in (p.temperature, p.top_k, p.top_p))
        if p.best_of not in (None, 1):
            raise ApiError(400, "best_of is not supported", param="best_of")
        if p.temperature is not None and p.temperature <= 0:
            raise ApiError(400, "`temperature` must be strictly positive", param="temperature")
        try:
            return SamplingParams(
                temperature=(p.temperature or 1.0) if sample else 0.0,
                top_k=p.top_k or 0, top_p=p.top_p or 1.0,
                repetition_penalty=p.repetition_penalty or 1.0,
                frequency_penalty=p.frequency_penalty or 0.0, max_tokens=max_tokens,
                stop=p.stop, seed=p.seed, logprobs=p.top_n_tokens or 0,
                prompt_logprobs=0 if p.decoder_input_details else None)
        except ValueError as e:
            raise ApiError(400, str(e)) from None
