"""One sample's state as it moves through the engine (a request with n > 1 has n sequences)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from corral.outputs import Logprobs
from corral.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_hashed_blocks: int = 0  # leading blocks of block_table already in the prefix cache
    seed: int | None = None  # this sample's seed (params.seed + index); None: unseeded
    logprobs: list[Logprobs] = field(default_factory=list)
    prompt_logprobs: list[Logprobs | None] = field(default_factory=list)
    text: str = ""  # detokenized output (stop strings already cut)
    num_text_sent: int = 0  # chars of `text` already handed out in deltas
    num_tokens_sent: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    detok: object | None = None  # IncrementalDetokenizer
    num_preemptions: int = 0
    matcher: object | None = None  # xgrammar GrammarMatcher when params.structured is set
    lora: object | None = None  # model.lora.Adapter this sequence runs under (None: the base)
    # set by the engine at admission so the per-token finish check is two lookups
    end_ids: frozenset[int] = frozenset()  # EOS (unless ignore_eos) and stop_token_ids
    max_num_tokens: int = 2**62  # prompt + output length at which it stops ("length")
    plain: bool = False  # no logprobs, penalties, min_tokens or grammar: sampling alone
    sample_row: tuple | None = None  # the sampler's view of params (sampler._sample_row)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and self.index == 0
