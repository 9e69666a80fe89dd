"""Perplexity of a text file, computed the way llama.cpp's `llama-perplexity` does.

The text is tokenized once (with the tokenizer's own special tokens: BOS where it adds one)
and cut into non-overlapping chunks of `n_ctx` tokens; the tail shorter than a chunk is
dropped. When the tokenizer adds a BOS, each chunk's first token is replaced by BOS. Only the
second half of each chunk is scored: the logits at positions n_ctx/2 .. n_ctx-2 predict tokens
n_ctx/2+1 .. n_ctx-1, so every scored token has at least n_ctx/2 tokens of context. PPL is
exp(mean NLL) over all scored tokens; its error is llama.cpp's: PPL x the standard error of
the per-token NLL (sqrt(var / (count - 1))).

The log-probabilities come from the engine's own forward pass (prompt logprobs), so a .gguf
runs on its quantized blocks exactly as it does for generation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from corral.errors import CorralError


@dataclass
class PerplexityResult:
    """One perplexity run: the estimate, its error and what was scored."""

    ppl: float
    stderr: float  # of ppl (llama.cpp's "+/-")
    mean_nll: float
    scored_tokens: int
    chunks: int
    n_ctx: int
    text_tokens: int
    add_bos: bool
    seconds: float
    chunk_ppl: list[float] = field(default_factory=list)  # running estimate after each chunk

    def to_dict(self) -> dict:
        return asdict(self)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether encoding text puts the BOS token first (llama.cpp: tokenizer.ggml.add_bos_token,
    which transformers' GGUF conversion carries into the tokenizer)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer.encode("a")
    return bool(ids) and ids[0] == bos and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]


def make_chunks(ids: Sequence[int], n_ctx: int, bos_id: int | None,
                max_chunks: int | None = None) -> list[list[int]]:
    """Non-overlapping chunks of n_ctx tokens; the first token of each becomes `bos_id` when
    given (llama-perplexity's rule); the tail shorter than n_ctx is dropped."""
    if n_ctx < 4:
        raise CorralError(f"--context must be at least 4 tokens, got {n_ctx}")
    n = len(ids) // n_ctx
    if max_chunks is not None:
        n = min(n, max_chunks)
    if n < 1:
        raise CorralError(f"the text has {len(ids)} tokens: perplexity with a context of {n_ctx} "
                          f"needs at least {n_ctx} (use a longer text or a smaller --context)")
    chunks = []
    for i in range(n):
        chunk = list(ids[i * n_ctx:(i + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        chunks.append(chunk)
    return chunks


def first_scored(n_ctx: int) -> int:
    """Index of the first logits row scored in a chunk (it predicts token first + 1)."""
    return n_ctx // 2


class NLLAccumulator:
    """Running sums of per-token negative log-likelihoods (llama.cpp's nll, nll2, count)."""

    def __init__(self):
        self.nll = 0.0
        self.nll2 = 0.0
        self.count = 0

    def add(self, nlls: Sequence[float]) -> None:
        for v in nlls:
            self.nll += v
            self.nll2 += v * v
        self.count += len(nlls)

    def ppl(self) -> float:
        return math.exp(self.nll / self.count)

    def stderr(self) -> float:
        """PPL x sqrt(var(nll) / (count - 1)); 0 when it cannot be estimated."""
        mean = self.nll / self.count
        var = self.nll2 / self.count - mean * mean
        if var <= 0 or self.count < 2:
            return 0.0
        return math.sqrt(var / (self.count - 1)) * math.exp(mean)


def chunk_nlls(token_logprobs: Sequence[float], n_ctx: int) -> list[float]:
    """The scored NLLs of one chunk from the logprobs of its tokens 1..n_ctx-1 (entry j is
    log p(token j+1 | tokens 0..j), as prompt logprobs give them)."""
    if len(token_logprobs) != n_ctx - 1:
        raise ValueError(f"expected {n_ctx - 1} token logprobs, got {len(token_logprobs)}")
    return [-float(lp) for lp in token_logprobs[first_scored(n_ctx):]]


def engine_chunk_logprobs(llm, chunks: list[list[int]]) -> list[list[float]]:
    """log p(token j+1 | tokens ..j) for j = 0..n_ctx-2 of each chunk, from the engine."""
    from corral import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, ignore_eos=True,
                            detokenize=False)
    outs = llm.generate(chunks, params, use_tqdm=False)
    result = []
    for chunk, out in zip(chunks, outs):
        if out.error or out.prompt_logprobs is None:
            raise CorralError(f"the engine returned no prompt logprobs: {out.error or 'none'}")
        lps = out.prompt_logprobs  # [None, {token: logprob}, ...] one per prompt token
        result.append([lps[j + 1][chunk[j + 1]] for j in range(len(chunk) - 1)])
    return result


def perplexity(llm, text: str, n_ctx: int = 512, max_chunks: int | None = None,
               batch: int = 1, progress: Callable[[str], None] | None = None) -> PerplexityResult:
    """Perplexity of `text` under the engine `llm` (a corral LLM), llama-perplexity's way.
    `batch` chunks go to the engine at once; `progress` gets llama.cpp-style "[i]ppl," parts."""
    tok = llm.tokenizer
    if tok is None:
        raise CorralError("perplexity needs a model with a tokenizer")
    t0 = time.perf_counter()
    ids = tok.encode(text)
    bos = tok.bos_token_id if tokenizer_adds_bos(tok) else None
    res = perplexity_of_ids(llm, ids, n_ctx, bos, max_chunks, batch, progress)
    res.seconds = time.perf_counter() - t0
    return res


def perplexity_of_ids(llm, ids: Sequence[int], n_ctx: int = 512, bos_id: int | None = None,
                      max_chunks: int | None = None, batch: int = 1,
                      progress: Callable[[str], None] | None = None) -> PerplexityResult:
    """`perplexity` on token ids already made; `bos_id` replaces each chunk's first token."""
    if n_ctx + 1 > llm.max_model_len:
        raise CorralError(f"--context {n_ctx} does not fit the model's length "
                          f"{llm.max_model_len} (raise --max-model-len or lower --context)")
    t0 = time.perf_counter()
    chunks = make_chunks(ids, n_ctx, bos_id, max_chunks)
    acc = NLLAccumulator()
    running = []
    step = max(1, batch)
    for i in range(0, len(chunks), step):
        for lps in engine_chunk_logprobs(llm, chunks[i:i + step]):
            acc.add(chunk_nlls(lps, n_ctx))
            running.append(acc.ppl())
            if progress:
                progress(f"[{len(running)}]{running[-1]:.4f},")
    return PerplexityResult(ppl=acc.ppl(), stderr=acc.stderr(), mean_nll=acc.nll / acc.count,
                            scored_tokens=acc.count, chunks=len(chunks), n_ctx=n_ctx,
                            text_tokens=len(ids), add_bos=bos_id is not None,
                            seconds=time.perf_counter() - t0, chunk_ppl=running)
