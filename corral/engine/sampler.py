"""Per-request sampling inside one batch: each row has its own temperature, filters, penalties
and random generator, so a seeded request gives the same tokens whatever else is running.

Everything is batched over rows: the per-row parameters become small host tensors (one copy to
the device each), the filters and penalties run as whole-batch tensor ops, and the chosen ids
cross back to the host in one transfer per step. The only per-row work left is one
`torch.multinomial` launch per seeded row (its own generator keeps it reproducible; no sync).
"""

from __future__ import annotations

import torch

from corral.engine.sequence import Sequence
from corral.outputs import Logprobs


def _rows(flags: list[bool]) -> list[int]:
    return [i for i, f in enumerate(flags) if f]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty (CTRL / transformers rule) over prompt + output tokens;
    presence / frequency penalties (OpenAI rule) over output tokens."""
    dev, vocab = logits.device, logits.shape[1]
    rep = _rows([s.params.repetition_penalty != 1.0 for s in seqs])
    if rep:
        # one [R, V] "seen" mask from all the rows' tokens at once
        lens = [seqs[i].num_tokens for i in rep]
        toks = torch.tensor([t for i in rep for t in seqs[i].token_ids], dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(rep)), torch.tensor(lens))
        seen = torch.zeros(len(rep), vocab, dtype=torch.bool)
        seen[row_of, toks] = True
        seen = seen.to(dev, non_blocking=True)
        pen = torch.tensor([seqs[i].params.repetition_penalty for i in rep],
                           dtype=logits.dtype).to(dev, non_blocking=True)[:, None]
        idx = torch.tensor(rep).to(dev, non_blocking=True)
        vals = logits.index_select(0, idx)
        penalized = torch.where(vals > 0, vals / pen, vals * pen)
        logits.index_copy_(0, idx, torch.where(seen, penalized, vals))
    freq = _rows([bool(s.params.presence_penalty or s.params.frequency_penalty)
                  and s.num_output_tokens > 0 for s in seqs])
    if freq:
        lens = [seqs[i].num_output_tokens for i in freq]
        toks = torch.tensor([t for i in freq for t in seqs[i].output_token_ids], dtype=torch.long)
        row_of = torch.repeat_interleave(torch.arange(len(freq)), torch.tensor(lens))
        counts = torch.zeros(len(freq), vocab, dtype=logits.dtype)
        counts.index_put_((row_of, toks), torch.ones(len(toks), dtype=logits.dtype),
                          accumulate=True)
        counts = counts.to(dev, non_blocking=True)
        fp = torch.tensor([[seqs[i].params.frequency_penalty, seqs[i].params.presence_penalty]
                           for i in freq], dtype=logits.dtype).to(dev, non_blocking=True)
        idx = torch.tensor(freq).to(dev, non_blocking=True)
        delta = fp[:, :1] * counts + fp[:, 1:] * (counts > 0)
        logits.index_add_(0, idx, -delta)


def block_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    """Forbid end tokens until a request's min_tokens are out."""
    rows, cols = [], []
    for row in _rows([s.num_output_tokens < s.params.min_tokens for s in seqs]):
        ids = list(eos_ids) + list(seqs[row].params.stop_token_ids)
        rows += [row] * len(ids)
        cols += ids
    if rows:
        dev = logits.device
        logits[torch.tensor(rows).to(dev), torch.tensor(cols).to(dev)] = float("-inf")


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor, *, sort: bool | None = None,
                  use_min_p: bool | None = None) -> torch.Tensor:
    """Mask to -inf what top-k / top-p / min-p exclude. logits [N, V] already temperature-scaled;
    top_k [N] (0 = off), top_p [N], min_p [N]. `sort` / `use_min_p`: whether any row needs the
    top-k/p sort / min-p, when the caller knows (saves a device->host sync); None: look."""
    vocab = logits.shape[1]
    if sort is None:
        sort = bool((top_k > 0).any()) or bool((top_p < 1).any())
    if use_min_p is None:
        use_min_p = bool((min_p > 0).any())
    if sort:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        drop = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        # keep the smallest set whose mass reaches top_p (the top token is always kept)
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, idx, sorted_logits)
    if use_min_p:
        probs = logits.softmax(dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def sample_tensor(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Pick one token per row of fp32 logits [N, V] (penalties already applied); returns the ids
    as an int64 tensor [N] on the logits' device, with no device->host sync."""
    dev = logits.device
    params = [s.params for s in seqs]
    greedy = logits.argmax(dim=-1)
    rand = _rows([p.temperature > 0 for p in params])
    if not rand:
        return greedy
    sub_params = [params[i] for i in rand]
    # top_k over the vocabulary keeps every token (and never overflows the float row)
    vocab = logits.shape[1]
    host = torch.tensor([[p.temperature, p.top_p, p.min_p, min(p.top_k, vocab)]
                         for p in sub_params],
                        dtype=torch.float32)
    if dev.type == "cuda":
        host = host.pin_memory()
    host = host.to(dev, non_blocking=True)
    idx = torch.tensor(rand).to(dev, non_blocking=True)
    sub = logits.index_select(0, idx) / host[:, 0:1]
    sub = filter_logits(sub, host[:, 3].long(), host[:, 1], host[:, 2],
                        sort=any(p.top_k > 0 or p.top_p < 1 for p in sub_params),
                        use_min_p=any(p.min_p > 0 for p in sub_params))
    probs = sub.softmax(dim=-1)
    seeded = [j for j, p in enumerate(sub_params) if p.seed is not None]
    unseeded = [j for j, p in enumerate(sub_params) if p.seed is None]
    picks = torch.empty(len(rand), dtype=torch.long, device=dev)
    if unseeded:
        # one draw for all of them; the first row's generator keeps runs repeatable under the
        # engine's seed (their requests asked for no reproducibility of their own)
        rows = torch.tensor(unseeded).to(dev, non_blocking=True)
        gen = seqs[rand[unseeded[0]]].generator
        picks[rows] = torch.multinomial(probs.index_select(0, rows), 1, generator=gen)[:, 0]
    for j in seeded:  # each on its own generator, exactly as a request alone would draw
        picks[j] = torch.multinomial(probs[j], 1, generator=seqs[rand[j]].generator)[0]
    return greedy.index_copy(0, idx, picks)


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Pick one token per row of fp32 logits [N, V] (penalties already applied): one
    device->host transfer for the whole batch."""
    return sample_tensor(logits, seqs).tolist()


def top_logprobs(logprobs: torch.Tensor, chosen: int, n: int) -> dict[int, float]:
    """{token: logprob} with the chosen token and the n most likely. logprobs: [V]."""
    return batch_top_logprobs(logprobs[None], [chosen], [n])[0]


def batch_top_logprobs(logprobs: torch.Tensor, chosen: list[int], ns: list[int]) -> list[Logprobs]:
    """Per row, {token: logprob} with the chosen token and the row's n most likely
    (logprobs [N, V]); one device->host transfer for all rows."""
    if not chosen:
        return []
    dev = logprobs.device
    picked = logprobs.gather(1, torch.tensor(chosen, device=dev)[:, None])[:, 0]
    k = max(ns)
    if k > 0:
        vals, ids = logprobs.topk(k, dim=-1)
        # ids ride along as floats (exact below 2**24) so one copy brings back everything
        table = torch.cat([picked[:, None], vals, ids.to(picked.dtype)], dim=1).tolist()
        rows = [(r[0], r[1:1 + k], r[1 + k:]) for r in table]
    else:
        rows = [(v, [], []) for v in picked.tolist()]
    out = []
    for tok, n, (p, vs, ts) in zip(chosen, ns, rows):
        d = {tok: p}
        for v, t in zip(vs[:n], ts[:n]):
            d.setdefault(int(t), v)
        out.append(d)
    return out
