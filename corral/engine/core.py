"""EngineCore: requests in, one scheduled step at a time, RequestOutputs (with deltas) out.

Not thread-safe: LLM drives it in a loop, AsyncLLM from one background thread.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from corral.engine.config import EngineConfig
from corral.engine.detokenizer import (
    IncrementalDetokenizer,
    check_stop_strings,
    streamable_text_end,
)
from corral.engine.kv_cache import BlockManager
from corral.engine.runner import ModelRunner, kv_bytes_per_block
from corral.engine.sampler import apply_penalties, block_stop_tokens, sample, top_logprobs
from corral.engine.scheduler import Scheduler, SchedulerConfig
from corral.engine.sequence import Sequence
from corral.engine.structured import StructuredCompiler
from corral.errors import CorralError
from corral.outputs import CompletionOutput, RequestMetrics, RequestOutput
from corral.sampling_params import SamplingParams

log = logging.getLogger("corral.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float  # fraction of blocks in use
    prefix_cache_hit_rate: float
    num_preemptions: int
    num_requests: int  # requests not yet finished


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    pending: list[Sequence] = field(default_factory=list)  # n>1 samples waiting for the prompt
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.time()))
    error: str | None = None

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)


class EngineCore:
    def __init__(self, config: EngineConfig):
        from corral.loading import (
            load_config,
            load_tokenizer,
            parse_rope_scaling,
            resolve_device,
            resolve_dtype,
            resolve_source,
        )
        from corral.model.llama import LlamaForCausalLM, context_length

        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        src = resolve_source(config.model, config.revision)
        self._check_quantization(src)
        rope = config.rope_scaling
        if isinstance(rope, str):
            rope = parse_rope_scaling(rope)
        self.model_config = load_config(src, rope)
        self.tokenizer = load_tokenizer(src)
        limit = context_length(self.model_config)
        self.max_model_len = min(config.max_model_len or limit, limit)
        if src.folder is None:
            self.model = LlamaForCausalLM.random(self.model_config, self.dtype, self.device,
                                                 seed=config.seed, max_len=self.max_model_len)
        else:
            self.model = LlamaForCausalLM.from_folder(src.folder, self.model_config, self.dtype,
                                                      self.device, max_len=self.max_model_len)
        self.source = src
        self.weights = self._attach_kernels(src)
        self.eos_token_ids = _eos_ids(src, self.model_config, self.tokenizer)
        cuda = self.device.type == "cuda"
        bs = config.block_size
        num_blocks = self._num_kv_blocks(bs)
        self.max_model_len = min(self.max_model_len, num_blocks * bs)  # the cache must hold one full sequence
        self.bm = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs or (256 if cuda else 64),
                max_num_batched_tokens=config.max_num_batched_tokens or (8192 if cuda else 1024),
            ),
            self.bm,
        )
        self.runner = ModelRunner(self.model, num_blocks, bs, self.dtype, self.device)
        if cuda and config.cuda_graphs:
            self._capture_decode_graphs()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)
        self._chat_format = None
        self._structured: StructuredCompiler | None = None
        self._structured_lock = threading.Lock()

    # ---- setup -------------------------------------------------------------------------

    def _num_kv_blocks(self, block_size: int) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        per_block = kv_bytes_per_block(self.model_config, block_size, self.dtype)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            budget = total * self.config.gpu_memory_utilization - (total - free) - 2 * 2**30
            if self.config.kv_cache_memory_gb:
                budget = min(budget, self.config.kv_cache_memory_gb * 2**30)
        else:
            budget = (self.config.kv_cache_memory_gb or 1.0) * 2**30
        num = int(budget // per_block)
        seqs = self.config.max_num_seqs or (256 if self.device.type == "cuda" else 64)
        useful = seqs * ((self.max_model_len + block_size - 1) // block_size) + 1
        num = min(num, useful)
        if num < 2:
            raise CorralError(f"no room for the KV cache ({budget / 2**30:.2f} GiB available, "
                              f"{per_block / 2**20:.1f} MiB per block); raise --kv-cache-memory")
        return num

    def _capture_decode_graphs(self) -> None:
        from corral.model.attention import decode_uses_triton

        if not decode_uses_triton(self.device):
            # the PyTorch decode path would gather every sequence's full-width block table
            log.warning("CUDA graphs need triton for decode attention; decoding eagerly")
            return
        free_before = torch.cuda.mem_get_info(self.device)[0]
        start = time.perf_counter()
        self.runner.capture_decode_graphs(self.scheduler.config.max_num_seqs, self.max_model_len)
        torch.cuda.synchronize(self.device)
        used = free_before - torch.cuda.mem_get_info(self.device)[0]
        sizes = self.runner.graphs.sizes
        log.info("captured %d CUDA graphs for decode (batch %d..%d) in %.1f s, %.0f MiB",
                 len(sizes), sizes[0], sizes[-1], time.perf_counter() - start, used / 2**20)

    def _check_quantization(self, src) -> None:
        """Refuse a `quantization` that cannot apply, before any weights are read."""
        q = self.config.quantization
        if q is None:
            return
        from corral.model.quantize import QUANTIZATIONS

        if q not in QUANTIZATIONS:
            raise CorralError(f"unknown quantization {q!r} (choose from: {', '.join(QUANTIZATIONS)})")
        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise CorralError(f"--quantize {q} needs --device cpu and --dtype float32 (got "
                              f"{self.device.type}, {str(self.dtype).removeprefix('torch.')})")
        if src.gguf:
            # its weights are already quantized: re-quantizing would only add error
            raise CorralError(f"--quantize {q}: {src.gguf.name} is already quantized and decodes "
                              f"on its own blocks; drop --quantize")

    def _attach_kernels(self, src) -> str:
        """CPU fp32: decode steps read quantized blocks (3-5x fewer bytes than the dense fp32
        copy, which prefill keeps using), from a .gguf file or quantized at load on request.
        Returns the weight path."""
        dense = f"dense {str(self.dtype).removeprefix('torch.')}"
        if self.config.quantization:  # checked by _check_quantization
            from corral.model.quantize import attach_q8_0

            return attach_q8_0(self.model)
        if not (self.config.gguf_kernels and src.gguf and self.device.type == "cpu"
                and self.dtype == torch.float32):
            return dense
        from corral.model.gguf_kernels import attach_gguf_kernels

        return attach_gguf_kernels(self.model, src.gguf)

    @property
    def chat_format(self):
        if self._chat_format is None and self.tokenizer is not None:
            from corral.chat import get_chat_format

            self._chat_format = get_chat_format(self.config.chat_format, self.tokenizer)
        return self._chat_format

    @property
    def info(self) -> dict:
        n_params = sum(p.numel() for p in self.model.parameters())
        return {
            "name": self.config.model,
            "params": n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_model_len": self.max_model_len,
            "chat_format": getattr(self.chat_format, "name", None),
            "kv_blocks": self.bm.num_blocks,
            "block_size": self.bm.block_size,
            "weights": self.weights,
        }

    @property
    def structured(self) -> StructuredCompiler:
        """The grammar compiler for this tokenizer (built on first use; thread-safe)."""
        with self._structured_lock:
            if self._structured is None:
                if self.tokenizer is None:
                    raise CorralError("structured outputs need a tokenizer")
                stops = list(self.eos_token_ids)
                try:
                    stops += self.chat_format.stop_token_ids(self.tokenizer)
                except CorralError:  # no chat format: EOS alone ends a constrained answer
                    pass
                self._structured = StructuredCompiler(self.tokenizer, self.model_config.vocab_size,
                                                      sorted(set(stops)))
            return self._structured

    def compile_structured(self, params: SamplingParams) -> None:
        """Compile params.structured now (any thread). Raises StructuredOutputError."""
        if params.structured is not None:
            self.structured.compile(params.structured)

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | list[int],
                    params: SamplingParams | None = None) -> Request:
        """Queue a request. Raises CorralError for a prompt that cannot run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise CorralError(f"request id {request_id!r} is already running")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise CorralError("this model has no tokenizer: pass token ids")
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise CorralError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise CorralError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise CorralError(f"the prompt has {len(ids)} tokens; this model's context is "
                              f"{self.max_model_len} tokens (including the answer)")
        self.compile_structured(params)  # normally done already, off the engine thread
        req = Request(request_id, text, ids, params, [])
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params)
            if params.structured is not None:
                seq.matcher = self.structured.matcher(params.structured)
            seed = params.seed + i if params.seed is not None else int(
                torch.randint(0, 2**62, (1,), generator=self._rng))
            seq.generator = torch.Generator(device=self.device).manual_seed(seed)
            if self.tokenizer is not None and params.detokenize:
                seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
            req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        req.pending = req.seqs[1:]
        if not self.bm.enable_prefix_caching:
            self._release(req)
        return req

    def _release(self, req: Request) -> None:
        for seq in reversed(req.pending):
            self.scheduler.add(seq, front=True)
        req.pending = []

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            seq.matcher = None
            if not seq.finished:
                seq.finish_reason = "abort"
                self.scheduler.finish(seq)
        req.pending = []
        return self._snapshot(req)

    def has_work(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        used = self.bm.num_blocks - self.bm.num_free_blocks
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            num_free_blocks=self.bm.num_free_blocks, num_total_blocks=self.bm.num_blocks,
            kv_usage=used / self.bm.num_blocks,
            prefix_cache_hit_rate=self.bm.prefix_cache_hit_rate,
            num_preemptions=self.scheduler.num_preemptions, num_requests=len(self.requests),
        )

    # ---- the step ----------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; return a snapshot of every request that changed."""
        for req in self.requests.values():
            if req.pending and req.seqs[0].num_computed_tokens >= req.seqs[0].num_prompt_tokens:
                self._release(req)
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        now = time.time()
        touched: dict[str, Request] = {}
        for seq in batch.seqs:
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        try:
            out = self.runner.execute(batch)
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the others
            return [self._fail(req, f"{type(e).__name__}: {e}") for req in touched.values()]
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.bm.commit_full_blocks(seq)
        for row, (logits, first) in out.prompt_logits.items():
            seq = batch.seqs[row]
            lp = torch.log_softmax(logits, dim=-1)
            for j in range(lp.shape[0]):
                tok = seq.token_ids[first + j]
                seq.prompt_logprobs.append(top_logprobs(lp[j], tok, seq.params.prompt_logprobs))
        if out.sample_rows:
            self._sample(batch, out)
        results = []
        for req in touched.values():
            results.append(self._snapshot(req))
            if req.finished:
                self.requests.pop(req.request_id, None)
        return results

    def _sample(self, batch, out) -> None:
        seqs = [batch.seqs[r] for r in out.sample_rows]
        logits = out.logits
        raw_lp = None
        if any(s.params.logprobs is not None for s in seqs):
            raw_lp = torch.log_softmax(logits, dim=-1)
        apply_penalties(logits, seqs)
        block_stop_tokens(logits, seqs, self.eos_token_ids)
        if any(s.matcher is not None for s in seqs):
            blocked = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
            self.structured.apply_masks(logits, [s.matcher for s in seqs], blocked)
        tokens = sample(logits, seqs)
        now = time.time()
        for j, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.token_ids.append(tok)
            if seq.params.logprobs is not None:
                seq.logprobs.append(top_logprobs(raw_lp[j], tok, seq.params.logprobs))
            m = self.requests[seq.request_id].metrics
            m.first_token_time = m.first_token_time or now
            m.last_token_time = now
            m.num_cached_tokens = max(m.num_cached_tokens, seq.num_cached_tokens)
            if seq.matcher is not None:
                self._advance_matcher(seq, tok)
            self._check_finish(seq, tok)

    def _advance_matcher(self, seq: Sequence, tok: int) -> None:
        if not seq.matcher.accept_token(tok):  # cannot happen under the mask; stop, never emit junk
            seq.finish_reason, seq.stop_reason = "error", tok
        elif seq.matcher.is_terminated():  # the grammar is complete and took its end token
            seq.finish_reason = "stop"
            if tok not in self.eos_token_ids:
                seq.stop_reason = tok

    def _check_finish(self, seq: Sequence, tok: int) -> None:
        p = seq.params
        if tok in self.eos_token_ids and not p.ignore_eos:
            seq.finish_reason = "stop"
        elif tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        if seq.detok is not None:
            delta = seq.detok.step(seq.token_ids, final=seq.finish_reason is not None)
            if check_stop_strings(seq, delta):
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            at_limit = p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens
            if not (at_limit or seq.num_tokens >= self.max_model_len):
                return
            seq.finish_reason = "length"
            # flush a character still waiting for its last byte
            if seq.detok is not None and check_stop_strings(
                    seq, seq.detok.step(seq.token_ids, final=True)):
                seq.finish_reason = "stop"
        seq.matcher = None  # release the grammar state
        self.scheduler.finish(seq)

    def _fail(self, req: Request, message: str) -> RequestOutput:
        req.error = message
        for seq in req.seqs:
            seq.matcher = None
            if not seq.finished:
                seq.finish_reason = "error"
                self.scheduler.finish(seq)
        req.pending = []
        self.requests.pop(req.request_id, None)
        return self._snapshot(req)

    def _snapshot(self, req: Request) -> RequestOutput:
        outputs = []
        for seq in req.seqs:
            end = streamable_text_end(seq)
            out_ids = seq.output_token_ids
            sent = seq.num_tokens_sent
            lp = seq.logprobs if seq.params.logprobs is not None else None
            outputs.append(CompletionOutput(
                index=seq.index, text=seq.text[:end], token_ids=list(out_ids),
                logprobs=list(lp) if lp is not None else None,
                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                delta_text=seq.text[seq.num_text_sent:end], delta_token_ids=out_ids[sent:],
                delta_logprobs=lp[sent:] if lp is not None else None,
            ))
            seq.num_text_sent, seq.num_tokens_sent = end, len(out_ids)
        finished = req.finished
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.time()
        first = req.seqs[0]
        prompt_lp = None
        if req.params.prompt_logprobs is not None and (
                len(first.prompt_logprobs) >= first.num_prompt_tokens - 1 or finished):
            prompt_lp = [None] + list(first.prompt_logprobs)
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outputs, finished,
                             prompt_lp, req.metrics, req.error)


def _eos_ids(src, config, tokenizer) -> list[int]:
    """End-of-sequence ids: generation_config.json's (Llama 3 lists several), the config's and
    the tokenizer's."""
    ids: set[int] = set()

    def add(v):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)

    if src.folder is not None and (src.folder / "generation_config.json").is_file():
        try:
            add(json.loads((src.folder / "generation_config.json").read_text()).get("eos_token_id"))
        except (OSError, ValueError):
            pass
    add(getattr(config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return sorted(ids)

