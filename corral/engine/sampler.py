"""Per-request sampling inside one batch: each row has its own temperature, filters, penalties
and seed, so a seeded request gives the same tokens whatever else is running.

Everything is batched over rows: the per-row parameters become one small host tensor (one copy
to the device), filters and penalties run as whole-batch tensor ops, and the chosen ids (with
-1 for rows that cannot be sampled) cross back to the host in one transfer per step.

Random rows draw by inverse CDF: one uniform number per row picks the token where the running
sum of the kept tokens' probabilities passes it. A seeded row's number is a hash of (its seed,
the index of the token being drawn): no generator state and no per-row generator call, the same
alone and in any batch, and the same again when a step is retried. Unseeded rows take theirs
from the engine's generator.

Top-k / top-p rows never sort the vocabulary to find their cut: one `topk` of K candidates
(a power of two above the row's top_k, at least `CANDIDATES`) holds it unless a token outside
them could still reach it (a flat distribution under top-p, a tie at the edge); only such a row
sorts its whole row. These rows draw in ranked order, the others in vocabulary order; which
way a row goes depends on that row alone.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from corral.engine.sequence import Sequence
from corral.outputs import Logprobs

CANDIDATES = 64  # the fewest top-k candidates looked at for a top-k / top-p row

_GOLDEN, _MIX1, _MIX2 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9),
                         np.uint64(0x94D049BB133111EB))


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer over a uint64 array (wrapping arithmetic)."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def seeded_uniforms(seeds: list[int], counters: list[int]) -> np.ndarray:
    """One float32 in [0, 1) per (seed, counter) pair, 24 random bits: a pure function of the
    pair, so a seeded request draws the same numbers whatever runs beside it."""
    with np.errstate(over="ignore"):
        z = _splitmix64(_splitmix64(np.array(seeds, dtype=np.uint64))
                        + np.array(counters, dtype=np.uint64))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """In place. Repetition penalty (CTRL / transformers rule) over prompt + output tokens;
    presence / frequency penalties (OpenAI rule) over output tokens.

    Sparse: only the (row, token) pairs that occurred are read and written, so the cost
    follows the tokens seen, not rows x vocabulary."""
    dev, vocab = logits.device, logits.shape[1]
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        keys = torch.tensor([i * vocab + t for i in rep for t in seqs[i].token_ids],
                            dtype=torch.long).unique()  # each (row, token) once
        rows, toks = keys.div(vocab, rounding_mode="floor"), keys.remainder(vocab)
        pen = torch.tensor([s.params.repetition_penalty for s in seqs], dtype=logits.dtype)
        pen = pen[rows].to(dev, non_blocking=True)
        rows, toks = rows.to(dev, non_blocking=True), toks.to(dev, non_blocking=True)
        vals = logits[rows, toks]
        logits[rows, toks] = torch.where(vals > 0, vals / pen, vals * pen)
    freq = [i for i, s in enumerate(seqs)
            if (s.params.presence_penalty or s.params.frequency_penalty)
            and s.num_output_tokens > 0]
    if freq:
        keys = torch.tensor([i * vocab + t for i in freq for t in seqs[i].output_token_ids],
                            dtype=torch.long)
        keys, counts = keys.unique(return_counts=True)
        rows, toks = keys.div(vocab, rounding_mode="floor"), keys.remainder(vocab)
        fp = torch.tensor([[s.params.frequency_penalty, s.params.presence_penalty]
                           for s in seqs], dtype=logits.dtype)[rows]
        delta = fp[:, 0] * counts.to(logits.dtype) + fp[:, 1]
        rows, toks = rows.to(dev, non_blocking=True), toks.to(dev, non_blocking=True)
        logits.index_put_((rows, toks), -delta.to(dev, non_blocking=True), accumulate=True)


def block_stop_tokens(logits: torch.Tensor, seqs: list[Sequence], eos_ids: list[int]) -> None:
    """Forbid end tokens until a request's min_tokens are out."""
    rows, cols = [], []
    for row, s in enumerate(seqs):
        if s.num_output_tokens < s.params.min_tokens:
            ids = list(eos_ids) + list(s.params.stop_token_ids)
            rows += [row] * len(ids)
            cols += ids
    if rows:
        dev = logits.device
        logits[torch.tensor(rows).to(dev), torch.tensor(cols).to(dev)] = float("-inf")


def _cut(probs: torch.Tensor, last_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The last kept rank per row, from probabilities ranked descending [N, K]: keep the top_k
    most likely (`last_k` = top_k - 1), and the smallest set whose mass reaches top_p (mass of
    the row's whole distribution; the top token is always kept)."""
    cs = probs.cumsum(dim=-1)  # never decreases: a sum of non-negative numbers
    last = (cs < top_p[:, None]).sum(dim=-1)  # ranks before the one that reaches top_p
    return torch.minimum(last, last_k).clamp_(min=0, max=probs.shape[1] - 1)


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  min_p: torch.Tensor) -> torch.Tensor:
    """Reference filter by full sort: mask to -inf what top-k / top-p / min-p exclude.
    logits [N, V] already temperature-scaled; top_k [N] (<= 0 or >= V: off), top_p [N],
    min_p [N]. Ties with the last kept token are kept (as the sampler does)."""
    vocab = logits.shape[1]
    probs = logits.softmax(dim=-1)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    vals = probs.sort(dim=-1, descending=True).values
    cut = vals.gather(1, _cut(vals, k - 1, top_p)[:, None])[:, 0]
    thr = torch.maximum(cut, vals[:, 0] * min_p.clamp(0.0, 1.0))
    return logits.masked_fill(probs < thr[:, None], float("-inf"))


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first column whose running sum of `weights` [N, K] exceeds u * total
    (u <= 1 - 2**-22, so u * total stays below total in fp32 and a column always exists)."""
    cdf = weights.cumsum(dim=-1)
    target = u[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0].clamp_(max=weights.shape[1] - 1)


def _top_candidates(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, ids) of the k largest per row of x [N, V], descending, as `topk`. On CPU, with
    many more 64-wide chunks than k, through the chunks' maxima first: the k largest lie in
    the k chunks with the largest maxima, so only those k x 64 values are ranked (a vectorized
    max over the row instead of a selection over all of it: ~20 us instead of ~100 us per
    row of 49,152 here). Ties may come out in another order than `topk`'s; the values are the
    same."""
    n, vocab = x.shape
    c = 64
    if x.device.type != "cpu" or vocab % c or vocab // c <= 4 * k:
        return x.topk(k, dim=-1)
    per_row = vocab // c
    x = x.contiguous()
    top = x.view(n, per_row, c).amax(dim=-1).topk(k, dim=-1).indices  # [N, k] chunk numbers
    rows = torch.arange(n, device=x.device)[:, None] * per_row
    cand = x.view(n * per_row, c).index_select(0, (top + rows).flatten()).view(n, k * c)
    vals, j = cand.topk(k, dim=-1)
    return vals, top.gather(1, j // c) * c + j % c


def _ranked_draw(vals: torch.Tensor, ids: torch.Tensor, scale: torch.Tensor, z: torch.Tensor,
                 last_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor | None,
                 u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token, weights, cut) per row from logits ranked descending `vals` [N, K] (the row's
    largest first) and their ids: weights exp((v - max) / T), probabilities weights / z (z: the
    row's whole sum; 1 where top_p is off, which `top_p` = inf then says), cut by top-k /
    top-p / min-p, drawn in ranked order."""
    w = ((vals - vals[:, :1]) / scale[:, None]).exp_()
    t = w.gather(1, _cut(w / z[:, None], last_k, top_p)[:, None])[:, 0]
    if min_p is not None:
        t = torch.maximum(t, min_p)  # w is p / p_max
    w.masked_fill_(w < t[:, None], 0.0)
    return ids.gather(1, _inverse_cdf(w, u)[:, None])[:, 0], w, t


def _draw(x: torch.Tensor, peak: torch.Tensor, scale: torch.Tensor, last_k: torch.Tensor,
          top_p: torch.Tensor, min_p: torch.Tensor | None, u: torch.Tensor,
          groups: dict[int, list[int]], with_p: list[int]) -> torch.Tensor:
    """Token per row of logits x [M, V] (peak: each row's largest, scale: its temperature).
    `groups`: {K: rows} for rows with top-k or top-p, drawn over their K largest logits in
    ranked order (their whole row sorted when their cut may lie past those, or when K >= V);
    other rows draw over the vocabulary in its order. `with_p`: the rows with top-p, the only
    ones whose cut needs the whole row's sum. Which way a row goes depends on that row alone,
    so its token does not depend on the batch. `min_p`: None when no row has it."""
    m, vocab = x.shape
    dev = x.device
    only = len(groups) == 1 and len(next(iter(groups.values()))) == m
    picks = None if only else torch.empty(m, dtype=torch.long, device=dev)
    z = torch.ones(m, dtype=x.dtype, device=dev)
    if with_p:  # sum over the row of exp((x - max) / T), rows with top-p only
        r = torch.tensor(with_p).to(dev, non_blocking=True) if len(with_p) < m else None
        # (a reduction's rounding may depend on the batch's shape when torch splits it over
        # threads: like the model's own logits, equal to a few ulp, not bit for bit)
        zp = (sel(x, r) - sel(peak, r)[:, None]).div_(sel(scale, r)[:, None]).exp_().sum(-1)
        z = zp if r is None else z.index_copy(0, r, zp)

    grouped: set[int] = set()
    for kk, rows in sorted(groups.items()):
        grouped.update(rows)
        r = torch.tensor(rows).to(dev, non_blocking=True) if len(rows) < m else None
        sub = sel(x, r)
        if kk < vocab:
            vals, ids = _top_candidates(sub, kk)
        else:
            vals, ids = sub.sort(dim=-1, descending=True)
        args = [sel(t, r) for t in (scale, z, last_k, top_p, min_p, u)]
        got, w, t = _ranked_draw(vals, ids, *args)
        if kk < vocab:
            # a token outside the candidates could reach the cut: sort those rows in full
            spill = w[:, -1] >= t
            if bool(spill.any()):
                spill = spill.nonzero()[:, 0]
                sp = spill if r is None else r[spill]
                vals, ids = x.index_select(0, sp).sort(dim=-1, descending=True)
                got[spill] = _ranked_draw(vals, ids, *[sel(t, sp) for t in (
                    scale, z, last_k, top_p, min_p, u)])[0]
        if picks is None:
            return got
        picks[r] = got
    rest = [i for i in range(m) if i not in grouped]
    if rest:
        r = torch.tensor(rest).to(dev, non_blocking=True) if len(rest) < m else None
        w = (sel(x, r) - sel(peak, r)[:, None]).div_(sel(scale, r)[:, None]).exp_()
        if min_p is not None:
            w.masked_fill_(w < sel(min_p, r)[:, None], 0.0)
        got = _inverse_cdf(w, sel(u, r))
        if r is None:
            return got
        picks[r] = got
    return picks


def sel(t: torch.Tensor | None, r: torch.Tensor | None) -> torch.Tensor | None:
    """Rows `r` of t (all of t when r is None; None stays None)."""
    return t if t is None or r is None else t.index_select(0, r)


def _candidates(top_k: int, vocab: int) -> int:
    """How many of a top-k / top-p row's most likely tokens to look at first: a power of two
    above its top_k (a function of the row alone), at least CANDIDATES."""
    k = CANDIDATES
    while top_k < vocab and k <= top_k:
        k *= 2
    return k


# u is drawn in [0, 1) and scaled by this so that u * total < total holds after fp32 rounding
_U_SCALE = np.float32(1.0 - 2.0**-22)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """Index of each row's maximum (the first one on ties; a NaN counts as the maximum), as
    torch.argmax. On CPU through numpy: torch's CPU argmax is ~10x slower than numpy's
    vectorized one (6.3 vs 0.55 ms for 64 x 49,152 fp32 here), which made greedy decoding's
    host time grow with the vocabulary."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        return torch.from_numpy(np.argmax(x.numpy(), axis=1))
    return x.argmax(dim=-1)


def _sample_row(seq: Sequence, vocab: int) -> tuple:
    """(scale, top_k - 1, top_p, min_p, K, vocab, bad) for a row, kept on the sequence (its
    parameters do not change while it runs). K: -1 greedy (or a bad temperature), 0 random
    over the whole vocabulary, else how many candidates its top-k / top-p cut looks at."""
    p = seq.params
    t = p.temperature
    bad = not (0 <= t < math.inf)  # NaN too
    top_k = p.top_k if 0 < p.top_k < vocab else vocab
    if bad or t == 0:
        k = -1
    elif top_k < vocab or p.top_p < 1:
        k = _candidates(top_k, vocab)
    else:
        k = 0
    row = (t if k >= 0 else 1.0, top_k - 1, p.top_p, min(max(p.min_p, 0.0), 1.0), k, vocab, bad)
    seq.sample_row = row
    return row


def sample_tensor(logits: torch.Tensor, seqs: list[Sequence],
                  rng: torch.Generator | None = None) -> torch.Tensor:
    """Tokens for fp32 logits [N, V] (penalties and masks applied): int64 [N] on the logits'
    device, -1 for a row that cannot be sampled (see `unsampleable_reason`). `rng` draws the
    unseeded rows' numbers. No device->host sync, except a one-flag check when some row has
    top-k / top-p (whether its cut may lie past its candidates)."""
    n, vocab = logits.shape
    dev = logits.device
    rows = [r if (r := s.sample_row) is not None and r[5] == vocab else _sample_row(s, vocab)
            for s in seqs]
    tokens = argmax_rows(logits)
    # the chosen logit is the row's peak, NaN if the row has one (argmax picks NaN first)
    peak = logits.gather(1, tokens[:, None])[:, 0]
    rand = [i for i, r in enumerate(rows) if r[4] >= 0]
    bad_t = [i for i, r in enumerate(rows) if r[6]]
    if not rand and not bad_t:  # all greedy: nothing to send
        return tokens.masked_fill(~torch.isfinite(peak), -1)
    r = len(rand)
    # one flat float32 array, one copy: scales [N], then per random row top_k - 1, top_p,
    # min_p, u and its row index (integers below 2**24 are exact)
    host = np.empty(n + 5 * r, dtype=np.float32)
    host[:n] = [row[0] for row in rows]
    groups: dict[int, list[int]] = {}
    any_min_p = False
    if rand:
        sub = np.array([rows[i][1:4] for i in rand], dtype=np.float32)  # [r, 3]
        sub[sub[:, 1] >= 1, 1] = np.inf  # top-p off: no cut, whatever the weights sum to
        host[n:n + 3 * r] = sub.T.ravel()
        any_min_p = bool(sub[:, 2].any())
        u = host[n + 3 * r:n + 4 * r]
        seeded = [j for j, i in enumerate(rand) if seqs[i].seed is not None]
        if seeded:
            u[seeded] = seeded_uniforms([seqs[rand[j]].seed for j in seeded],
                                        [seqs[rand[j]].num_output_tokens for j in seeded])
        if len(seeded) < r:
            free = [j for j in range(r) if seqs[rand[j]].seed is None]
            u[free] = torch.rand(len(free), generator=rng).numpy()
        u *= _U_SCALE
        host[n + 4 * r:] = rand
        for j, i in enumerate(rand):
            if rows[i][4]:
                groups.setdefault(rows[i][4], []).append(j)
    d = torch.from_numpy(host)
    if dev.type == "cuda":
        d = d.pin_memory()
    d = d.to(dev, non_blocking=True)
    scale = d[:n]
    broken = ~torch.isfinite(peak / scale)
    if bad_t:
        broken[torch.tensor(bad_t, device=dev)] = True
    if rand:
        last_k, top_p, mp, u = (d[n + c * r:n + (c + 1) * r] for c in range(4))
        idx = d[n + 4 * r:].long() if r < n else None
        with_p = [j for j, i in enumerate(rand) if rows[i][2] < 1]
        picks = _draw(sel(logits, idx), sel(peak, idx), sel(scale, idx), last_k.long(),
                      top_p, mp if any_min_p else None, u, groups, with_p)
        tokens = picks if idx is None else tokens.index_copy(0, idx, picks)
    return tokens.masked_fill(broken, -1)


def sample(logits: torch.Tensor, seqs: list[Sequence], rng: torch.Generator | None = None
           ) -> tuple[list[int], dict[int, str]]:
    """(token per row, {row: reason} for rows that cannot be sampled) for fp32 logits [N, V]
    (penalties already applied): one device->host transfer for the whole batch."""
    tokens = sample_tensor(logits, seqs, rng).tolist()
    bad = {}
    for i, t in enumerate(tokens):
        if t < 0:
            bad[i] = unsampleable_reason(logits[i], seqs[i].params.temperature)
    return tokens, bad


class RequestFault(str):
    """A reason that lies in the request's own values, not in the engine or the model (the
    server answers it as a client error)."""


def unsampleable_reason(row: torch.Tensor, temperature: float) -> str:
    """Why a row [V] has no sampling distribution (a rare path: it transfers its peak); a
    RequestFault unless the model's logits themselves are NaN."""
    if not (math.isfinite(temperature) and temperature >= 0):
        return RequestFault(f"temperature must be a finite number >= 0, got {temperature}")
    v = float(row.max())
    if math.isnan(v):
        return "the logits contain NaN (after penalties)"
    if v == float("-inf"):
        return RequestFault("every token is forbidden: the request's constraint, min_tokens "
                            "and stop tokens leave none of this model's vocabulary")
    if math.isinf(v):
        return RequestFault("the logits overflowed to infinity (check repetition_penalty)")
    return RequestFault(f"temperature {temperature} turns the logits into infinities; "
                        "use a larger temperature or 0 for greedy")


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
    k = min(max(ns), logprobs.shape[1])
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
