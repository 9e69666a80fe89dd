"""Per-request sampling inside one batch: each row has its own temperature, filters, penalties
and random generator, so a seeded request gives the same tokens whatever else is running."""

from __future__ import annotations

import torch

from corral.engine.sequence import Sequence


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty (CTRL / transformers rule) over prompt + output tokens;
    presence / frequency penalties (OpenAI rule) over output tokens."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[row, seen]
            logits[row, seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                            vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]]
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)


def block_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    """Forbid end tokens until a request's min_tokens are out."""
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            ids = list(eos_ids) + list(seq.params.stop_token_ids)
            if ids:
                logits[row, ids] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf what top-k / top-p / min-p exclude. logits [N, V] already temperature-scaled;
    top_k [N] (0 = off), top_p [N], min_p [N]."""
    vocab = logits.shape[1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        drop = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p (the top token is always kept)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_logits)
    if bool((min_p > 0).any()):
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Pick one token per row of fp32 logits [N, V] (penalties already applied)."""
    dev = logits.device
    temps = [s.params.temperature for s in seqs]
    greedy_rows = [i for i, t in enumerate(temps) if t == 0]
    rand_rows = [i for i, t in enumerate(temps) if t > 0]
    out = [0] * len(seqs)
    if greedy_rows:
        picks = logits[greedy_rows].argmax(dim=-1).tolist()
        for i, tok in zip(greedy_rows, picks):
            out[i] = tok
    if not rand_rows:
        return out
    sub = logits[rand_rows] / torch.tensor([temps[i] for i in rand_rows], device=dev)[:, None]
    params = [seqs[i].params for i in rand_rows]
    sub = filter_logits(
        sub,
        torch.tensor([p.top_k for p in params], device=dev),
        torch.tensor([p.top_p for p in params], device=dev, dtype=torch.float32),
        torch.tensor([p.min_p for p in params], device=dev, dtype=torch.float32),
    )
    probs = sub.softmax(dim=-1)
    for j, i in enumerate(rand_rows):
        out[i] = int(torch.multinomial(probs[j], 1, generator=seqs[i].generator))
    return out


def top_logprobs(logprobs: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    """{token: logprob} with the chosen token and the n most likely. logprobs: [V]."""
    d = {chosen: float(logprobs[chosen])}
    if n > 0:
        vals, ids = logprobs.topk(n)
        for v, t in zip(vals.tolist(), ids.tolist()):
            d.setdefault(t, v)
    return d
