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
    TokenDecoder,
    check_stop_strings,
    streamable_text_end,
)
from corral.engine.kv_cache import BlockManager
from corral.engine.runner import ModelRunner, StepLogits, kv_bytes_per_block, profiled_kv_budget
from corral.engine.sampler import (
    RequestFault,
    apply_penalties,
    batch_top_logprobs,
    block_stop_tokens,
    sample,
)
from corral.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from corral.engine.sequence import Sequence, Status
from corral.engine.structured import StructuredCompiler
from corral.engine.tp import TensorParallelError
from corral.errors import CorralError
from corral.outputs import CompletionOutput, Logprobs, RequestMetrics, RequestOutput
from corral.sampling_params import SamplingParams

log = logging.getLogger("corral.engine")

# Where a request's own tokens meet the Rust tokenizer, its panics (pyo3's PanicException
# derives from BaseException, not Exception) are that request's fault too; these are not.
_NOT_FAULTS = (KeyboardInterrupt, SystemExit, GeneratorExit)


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
    error_by_request: bool = False  # see RequestOutput
    prompt_logprobs_out: list | None = None  # [None] + every prompt position, once complete

    @property
    def finished(self) -> bool:
        for s in self.seqs:
            if s.status is not Status.FINISHED:
                return False
        return True


class EngineCore:
    def __init__(self, config: EngineConfig):
        self.tp = None
        try:
            self._build(config)
        except BaseException:
            if self.tp is not None:  # workers already started; they may wait mid-setup
                self.tp.close(kill=True)
            raise

    def _build(self, config: EngineConfig) -> None:
        from corral.engine.tp import check_tp_config
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
        check_tp_config(config, self.device)  # self.tp: set by _start_tp (a TPDriver)
        # CPU fp32 with kernels: a .gguf stays in its file (config/tokenizer cached only);
        # tensor parallelism shards the dense copy instead
        quantized_gguf = (config.gguf_kernels and self.device.type == "cpu"
                          and self.dtype == torch.float32 and config.tensor_parallel_size == 1)
        src = resolve_source(config.model, config.revision, weights=not quantized_gguf)
        self._check_quantization(src)
        rope = config.rope_scaling
        if isinstance(rope, str):
            rope = parse_rope_scaling(rope)
        self.model_config = load_config(src, rope)
        self.tokenizer = load_tokenizer(src)
        limit = context_length(self.model_config)
        self.max_model_len = min(config.max_model_len or limit, limit)
        self.weights = None
        if config.tensor_parallel_size > 1:
            self.weights = self._start_tp(src)
        elif src.gguf and quantized_gguf:
            self.weights = self._load_gguf(src)  # None: no kernel library, src is now dense
        elif config.quantization and src.folder is not None:
            self.weights = self._load_quantized(src)  # None: loads dense, packs after
        if self.weights is None and src.folder is None:
            self.model = LlamaForCausalLM.random(self.model_config, self.dtype, self.device,
                                                 seed=config.seed, max_len=self.max_model_len)
        elif self.weights is None:
            self.model = LlamaForCausalLM.from_folder(src.folder, self.model_config, self.dtype,
                                                      self.device, max_len=self.max_model_len)
        self.source = src
        if self.weights is None:
            self.weights = self._attach_kernels(src)
        self.lora = self._setup_lora()  # after the kernels: the wrappers keep what they find
        self.eos_token_ids = _eos_ids(src, self.model_config, self.tokenizer)
        cuda = self.device.type == "cuda"
        self.kv_dtype = self._kv_cache_dtype()
        bs = config.block_size
        num_blocks = self._num_kv_blocks(bs)
        if self.tp is not None:  # the smallest count any rank's memory holds
            num_blocks = self.tp.comm.min_int(num_blocks)
            if num_blocks < 2:
                raise CorralError("no room for the KV cache on one of the tensor-parallel "
                                  "ranks' GPUs (after its weights and the profiled step); "
                                  "free memory there or raise gpu_memory_utilization")
        self.max_model_len = min(self.max_model_len, num_blocks * bs)  # the cache must hold one full sequence
        self.bm = BlockManager(num_blocks, bs, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs or (256 if cuda else 64),
                max_num_batched_tokens=config.max_num_batched_tokens or (8192 if cuda else 1024),
            ),
            self.bm,
        )
        self.runner = ModelRunner(self.model, num_blocks, bs, self.dtype, self.device,
                                  self.kv_dtype)
        if self.lora is not None:
            self.runner.lora = self.lora
            self.scheduler.can_admit = self._lora_slot_ready
        if cuda and config.cuda_graphs and self.tp is None:  # graphs cannot hold collectives
            self._capture_decode_graphs()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._rng = torch.Generator().manual_seed(config.seed)  # unseeded requests' draws
        self._decoders: dict[bool, TokenDecoder] = {}  # by skip_special_tokens
        self._chat_format = None
        self._failed: dict[str, RequestOutput] = {}  # this step's failed requests
        self._produced: set[str] = set()  # this step's requests that got a token
        self._structured: StructuredCompiler | None = None
        self._structured_lock = threading.Lock()

    # ---- setup -------------------------------------------------------------------------

    def _kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's dtype from `kv_cache_dtype`: "auto" is fp16 for a CPU model whose
        matmuls take 8-bit activations (llama.cpp's default cache type: half the bytes a
        decode step streams, half the memory a token holds), else the model's own dtype (the
        fp32 paths stay exact). Only an fp32 CPU model (one process) can choose otherwise."""
        choice = (self.config.kv_cache_dtype or "auto").lower()
        names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
                 "fp16": torch.float16}
        if choice == "auto":
            from corral.model.gguf_kernels import runs_int8

            cpu32 = self.device.type == "cpu" and self.dtype == torch.float32
            return torch.float16 if cpu32 and runs_int8(self.model) else self.dtype
        if choice not in names:
            raise CorralError(f"unknown KV cache dtype {choice!r} (choose from: auto, float32, "
                              "float16)")
        dtype = names[choice]
        if dtype != self.dtype and (self.device.type != "cpu" or self.dtype != torch.float32
                                    or self.tp is not None):
            raise CorralError(f"--kv-cache-dtype {choice}: only an fp32 CPU model without "
                              "tensor parallelism keeps its cache in another dtype (this one "
                              f"is {str(self.dtype).removeprefix('torch.')} on "
                              f"{self.device.type}); leave it at auto")
        return dtype

    def _num_kv_blocks(self, block_size: int) -> int:
        if self.config.num_kv_blocks:
            return self.config.num_kv_blocks
        # the model's own config: under tensor parallelism, this rank's share of the KV heads
        per_block = kv_bytes_per_block(self.model.config, block_size, self.kv_dtype)
        if self.device.type == "cuda":
            driver, self.model.driver = getattr(self.model, "driver", None), None
            try:  # TP workers run the same profiled step at the same time (engine.tp)
                budget = profiled_kv_budget(
                    self.model, self.device, self.dtype, self.config.gpu_memory_utilization,
                    self.config.max_num_batched_tokens or 8192, self.config.max_num_seqs or 256,
                    self.max_model_len, block_size)
            finally:
                if driver is not None:
                    self.model.driver = driver
            if self.lora is not None:  # room for max_loras adapters of max_lora_rank
                budget -= self.lora.budget_bytes
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

    def _start_tp(self, src) -> str:
        """Spawn ranks 1..N-1 and load shard 0 here (engine.tp); returns the weight path."""
        from corral.engine.tp import TPDriver, load_rank_model
        from corral.model.tp_layers import make_shard

        n = self.config.tensor_parallel_size
        shard = make_shard(self.model_config, 0, n)  # refuses heads that do not divide first
        if src.gguf:
            log.warning("tensor parallelism shards the dense copy of %s (the quantized GGUF "
                        "kernels run unsplit models only)", src.gguf.name)
        self.tp = TPDriver(self.config, self.device)
        try:
            self.model = load_rank_model(self.config, src, self.model_config, shard, self.dtype,
                                         self.device, self.max_model_len)
            self.model.attach(self.tp.comm)
            per_rank = self.tp.comm.gather_ints(
                [self.model.param_bytes(), sum(p.numel() for p in self.model.parameters())])
        except BaseException:
            self.tp.close(kill=True)
            raise
        self.tp.rank_param_bytes = [b for b, _ in per_rank]
        self.tp.rank_params = [c for _, c in per_rank]
        self.model.driver = self.tp
        return f"dense {str(self.dtype).removeprefix('torch.')}, tensor parallel over {n} ranks"

    def close(self) -> None:
        """Stop the tensor-parallel workers (nothing to do for a one-process engine)."""
        if getattr(self, "tp", None) is not None:
            self.tp.close()

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

    def _load_gguf(self, src) -> str | None:
        """Build the model on the memory-mapped .gguf (no dense copy); returns the weight path.
        Without a kernel library (no compiler) it warns, materializes the dense fp32 folder
        into `src.folder` and returns None."""
        from corral.loading import materialize_gguf
        from corral.model import gguf_kernels as gk

        lib = gk.load_library()
        if lib is None:
            src.folder = materialize_gguf(src.gguf)
            return None
        self.model, desc = gk.load_gguf_model(src.gguf, self.model_config, lib,
                                              max_len=self.max_model_len,
                                              math=self.config.gguf_math)
        return desc

    def _load_quantized(self, src) -> str | None:
        """`--quantize` on a folder: packed while it is read, never a whole dense copy (a bf16
        Llama 3 8B would be 32 GB in fp32). Returns the weight path, or None when the folder
        must load dense first (no kernel library, or a hidden size without blocks of 32)."""
        from corral.model.quantize import load_quantized

        loaded = load_quantized(src.folder, self.model_config, self.config.quantization,
                                self.max_model_len, math=self.config.gguf_math)
        if loaded is None:
            return None
        self.model, desc = loaded
        return desc

    def _attach_kernels(self, src) -> str:
        """Dense models: `--quantize` packs the weights for the CPU kernels (no dense copy
        kept). Returns the weight path."""
        dense = f"dense {str(self.dtype).removeprefix('torch.')}"
        if self.config.quantization:  # checked by _check_quantization
            from corral.loading import release_freed_memory
            from corral.model.quantize import attach_quantized

            desc = attach_quantized(self.model, self.config.quantization,
                                    math=self.config.gguf_math)
            release_freed_memory()  # the dense weights just dropped, not kept by malloc
            return desc
        if src.gguf and self.config.gguf_kernels and self.device.type == "cpu" \
                and self.dtype == torch.float32:
            return f"{dense} (GGUF kernels unavailable)"
        return dense

    def _setup_lora(self):
        """The LoRA manager (wrappers installed, start-up adapters registered), or None."""
        cfg = self.config
        if not (cfg.enable_lora or cfg.lora_modules):
            return None
        from corral.model.lora import LoRAManager

        manager = LoRAManager(self.model, cfg.max_loras, cfg.max_lora_rank, self.dtype,
                              self.device)
        for name, path in (cfg.lora_modules or {}).items():
            manager.add(manager.load(name, path))
        if cfg.default_lora is not None:
            manager.get(cfg.default_lora)  # must be one of lora_modules
        return manager

    def _lora_slot_ready(self, seq: Sequence, running: list[Sequence]) -> bool:
        """Scheduler gate: a sequence under an adapter starts once the adapter is resident."""
        if seq.lora is None:
            return True
        in_use = {s.lora.id for s in running if s.lora is not None}
        return self.lora.activate(seq.lora, in_use)

    def _require_lora(self):
        if self.lora is None:
            from corral.model.lora import LoRAError

            raise LoRAError("LoRA adapters are not enabled on this engine (enable_lora=True, "
                            "or --lora NAME=PATH)")
        return self.lora

    def add_lora(self, adapter) -> None:
        """Register a loaded `model.lora.Adapter` (read it with `self.lora.load`, off this
        thread if steps are running); it becomes resident when a request first needs it."""
        self._require_lora().add(adapter)

    def remove_lora(self, name: str) -> None:
        """Forget an adapter; requests already running under it finish on it."""
        adapter = self._require_lora().remove(name)
        if not any(s.lora is adapter for s in self.scheduler.running):
            self.lora.resident.pop(adapter.id, None)  # free its slot now

    def resolve_lora(self, lora):
        """None / a name / a LoRARequest -> the registered Adapter (loading a LoRARequest's
        path the first time its name is seen)."""
        if lora is None:
            return None
        manager = self._require_lora()
        name = lora if isinstance(lora, str) else lora.name
        path = None if isinstance(lora, str) else lora.path
        if name not in manager.adapters and path is not None:
            manager.add(manager.load(name, path))
        return manager.get(name)

    @property
    def chat_format(self):
        if self._chat_format is None and self.tokenizer is not None:
            from corral.chat import get_chat_format

            self._chat_format = get_chat_format(self.config.chat_format, self.tokenizer)
        return self._chat_format

    @property
    def info(self) -> dict:
        n_params = getattr(self.model, "n_params", None) or sum(
            p.numel() for p in self.model.parameters())
        if self.tp is not None:  # the shards' sum, the replicated norms counted once
            norms = sum(p.numel() for name, p in self.model.named_parameters() if "norm" in name)
            n_params = sum(self.tp.rank_params) - (self.tp.world - 1) * norms
        return {
            "name": self.config.model,
            "params": n_params,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device": str(self.device),
            "max_model_len": self.max_model_len,
            "vocab_size": self.model_config.vocab_size,  # the server checks token ids with it
            "chat_format": getattr(self.chat_format, "name", None),
            "kv_blocks": self.bm.num_blocks,
            "kv_cache_dtype": str(self.kv_dtype).removeprefix("torch."),
            "block_size": self.bm.block_size,
            "weights": self.weights,
            "loras": self.lora.listing() if self.lora is not None else [],
            "tensor_parallel_size": self.config.tensor_parallel_size,
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
                    params: SamplingParams | None = None, lora=None) -> Request:
        """Queue a request (under the LoRA adapter `lora`: a name or LoRARequest; None: the
        base). Raises CorralError for a prompt that cannot run."""
        params = params or SamplingParams()
        adapter = self.resolve_lora(lora if lora is not None else self.config.default_lora)
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
        end_ids = frozenset(params.stop_token_ids).union(
            () if params.ignore_eos else self.eos_token_ids)
        max_num = self.max_model_len if params.max_tokens is None else min(
            self.max_model_len, len(ids) + params.max_tokens)
        # nothing for _pick to do beyond the sampler itself
        plain = (params.logprobs is None and not params.min_tokens and params.structured is None
                 and params.repetition_penalty == 1.0 and not params.presence_penalty
                 and not params.frequency_penalty)
        for i in range(params.n):
            seq = Sequence(next(self._seq_ids), request_id, i, list(ids), len(ids), params,
                           lora=adapter, end_ids=end_ids, max_num_tokens=max_num, plain=plain)
            if params.structured is not None:
                seq.matcher = self.structured.matcher(params.structured)
            if params.seed is not None:
                seq.seed = (params.seed + i) % 2**64
            if self.tokenizer is not None and params.detokenize:
                seq.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens,
                                                   self._decoder(params.skip_special_tokens))
            req.seqs.append(seq)
        self.requests[request_id] = req
        self.scheduler.add(req.seqs[0])
        req.pending = req.seqs[1:]
        if not self.bm.enable_prefix_caching:
            self._release(req)
        return req

    def _decoder(self, skip_special_tokens: bool) -> TokenDecoder:
        dec = self._decoders.get(skip_special_tokens)
        if dec is None:
            dec = self._decoders[skip_special_tokens] = TokenDecoder(self.tokenizer,
                                                                     skip_special_tokens)
        return dec

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
        return self._output(req)

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
        """Run one batch; return an output (deltas since the last one) for every request that
        produced something or finished.

        A fault that belongs to one request (its values, its tokens, a non-finite row of its
        logits, a forward that fails only with it in the batch) fails that request alone: its
        output carries `error` and its blocks are freed; everyone else keeps going.
        """
        self._failed = {}
        self._produced = set()
        for req in self.requests.values():
            if req.pending and req.seqs[0].num_computed_tokens >= req.seqs[0].num_prompt_tokens:
                self._release(req)
        try:
            batch = self.scheduler.schedule()
        except Exception as e:  # the culprit is unknown: fail every request
            log.exception("scheduling failed; failing every open request")
            return [self._fail(r, f"scheduling failed: {_describe(e)}")
                    for r in list(self.requests.values())]
        if not batch.seqs:
            return []
        now = time.time()
        touched: dict[str, Request] = {}
        for seq in batch.seqs:
            req = self.requests[seq.request_id]
            touched[req.request_id] = req
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
        for sub, out in self._forward(batch):
            self._after_forward(sub, out)
        results = []
        for rid, req in touched.items():
            if rid in self._failed:
                results.append(self._failed[rid])
                continue
            finished = req.finished
            if not finished and rid not in self._produced:
                continue  # a prompt chunk: nothing new to tell
            try:
                results.append(self._output(req, finished))
            except BaseException as e:  # see _NOT_FAULTS
                if isinstance(e, _NOT_FAULTS):
                    raise
                self._fault(req, "building the output failed", e)
                results.append(self._failed[rid])
                continue
            if finished:
                self.requests.pop(rid, None)
        return results

    def _live(self, seq: Sequence) -> bool:
        return seq.request_id not in self._failed and seq.request_id in self.requests

    def _fault(self, req: Request, what: str, e: BaseException | str) -> None:
        """Fail `req` alone (this step's output for it is the failed snapshot)."""
        if req.request_id in self._failed:
            return
        message = f"{what}: {e if isinstance(e, str) else _describe(e)}"
        req.error_by_request = isinstance(e, RequestFault)
        log.warning("request %s failed: %s", req.request_id, message,
                    exc_info=e if isinstance(e, BaseException) else None)
        self._failed[req.request_id] = self._fail(req, message)

    def _forward(self, batch: ScheduledBatch) -> list[tuple[ScheduledBatch, StepLogits]]:
        """Run the model on `batch`. If that raises, run halves of it (split by request) until
        the requests that make it fail run alone, and fail only those; a forward that fails
        for everyone fails every request of this step (the engine keeps running)."""
        try:
            return [(batch, self.runner.execute(batch))]
        except TensorParallelError:
            raise  # a rank is gone or out of step: no request is to blame, the engine stops
        except Exception as e:
            if self.tp is not None:  # a fault part-way through desynchronizes the ranks
                self.tp.failed = f"the forward failed on rank 0 ({_describe(e)})"
                self.tp.close(kill=True)
                raise TensorParallelError(self.tp.failed) from e
            groups = _rows_by_request(batch.seqs)
            if len(groups) == 1:
                self._fault(self.requests[groups[0][0]], "the model forward failed", e)
                return []
            log.warning("the model forward failed for a batch of %d requests (%s); retrying "
                        "it in parts to find the request that causes it", len(groups),
                        _describe(e))
        half = len(groups) // 2
        done = []
        for part in (groups[:half], groups[half:]):
            rows = sorted(r for _, rs in part for r in rs)
            done += self._forward(ScheduledBatch([batch.seqs[r] for r in rows],
                                                 [batch.num_new_tokens[r] for r in rows],
                                                 batch.num_preempted))
        return done

    def _after_forward(self, batch: ScheduledBatch, out: StepLogits) -> None:
        bm, bs = self.bm, self.bm.block_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens >= (seq.num_hashed_blocks + 1) * bs:  # a block filled
                bm.commit_full_blocks(seq)
        for row, lps in out.prompt_logprobs.items():
            batch.seqs[row].prompt_logprobs.extend(lps)
        if out.sample_rows:
            self._sample(batch, out)

    def _sample(self, batch: ScheduledBatch, out: StepLogits) -> None:
        keep = ([j for j, r in enumerate(out.sample_rows) if self._live(batch.seqs[r])]
                if self._failed else range(len(out.sample_rows)))
        if not keep:
            return
        seqs = [batch.seqs[out.sample_rows[j]] for j in keep]
        logits = out.logits if len(keep) == len(out.sample_rows) else out.logits[keep]
        first = seqs[0].request_id
        several = any(s.request_id != first for s in seqs)
        try:
            # with several requests, keep the logits intact for a retry without the bad one
            tokens, lps, bad = self._pick(logits, seqs, keep_input=several)
        except Exception as e:  # noqa: BLE001 - isolated below
            if not several:
                self._fault(self.requests[first], "sampling failed", e)
                return
            tokens, lps, bad = self._pick_each(logits, seqs, e)
        for j, reason in bad.items():
            self._fault(self.requests[seqs[j].request_id], "sampling failed", reason)
        now = time.time()
        failed, produced, requests = self._failed, self._produced, self.requests
        for seq, tok, lp in zip(seqs, tokens, lps):
            rid = seq.request_id
            if rid in failed:
                continue
            req = requests[rid]
            try:
                seq.token_ids.append(tok)
                if lp is not None:
                    seq.logprobs.append(lp)
                m = req.metrics
                if m.first_token_time is None:
                    m.first_token_time = now
                m.last_token_time = now
                m.num_cached_tokens = max(m.num_cached_tokens, seq.num_cached_tokens)
                if seq.matcher is not None:
                    self._advance_matcher(seq, tok)
                self._check_finish(seq, tok)
            except BaseException as e:  # its detokenizer, stop rules
                if isinstance(e, _NOT_FAULTS):
                    raise
                self._fault(req, "processing the sampled token failed", e)
                continue
            produced.add(rid)

    def _pick_each(self, logits: torch.Tensor, seqs: list[Sequence], error: Exception
                   ) -> tuple[list[int], list[Logprobs | None], dict[int, str]]:
        """After sampling failed for a batch of several requests: each request alone (its
        own failure fails it alone). Seeded rows draw from (seed, position) only, so their
        tokens are the ones the batch would have given."""
        groups = _rows_by_request(seqs)
        log.warning("sampling failed for a batch of %d requests (%s); sampling each "
                    "request alone", len(groups), _describe(error))
        tokens, lps, bad = [0] * len(seqs), [None] * len(seqs), {}
        for rid, js in groups:
            try:
                t, lp, b = self._pick(logits[js], [seqs[j] for j in js], keep_input=False)
            except Exception as e:  # noqa: BLE001 - this request's values
                self._fault(self.requests[rid], "sampling failed", e)
                continue
            for k, j in enumerate(js):
                tokens[j], lps[j] = t[k], lp[k]
                if k in b:
                    bad[j] = b[k]
        return tokens, lps, bad

    def _pick(self, logits: torch.Tensor, seqs: list[Sequence], keep_input: bool
              ) -> tuple[list[int], list[Logprobs | None], dict[int, str]]:
        """Tokens for fp32 logits [N, V], each row's logprobs entry (when it asked for
        logprobs) and {row: reason} for rows that cannot be sampled. Penalties and masks
        write into the logits: on a copy when `keep_input`, and only if some row has them."""
        if all(s.plain for s in seqs):
            tokens, bad = sample(logits, seqs, self._rng)
            return tokens, [None] * len(seqs), bad
        vocab = logits.shape[1]
        want = [j for j, s in enumerate(seqs) if s.params.logprobs is not None]
        too_many = {j: RequestFault(f"logprobs must be at most the vocabulary size ({vocab}), "
                                    f"got {seqs[j].params.logprobs}")
                    for j in want if not 0 <= seqs[j].params.logprobs <= vocab}
        want = [j for j in want if j not in too_many]
        raw_lp = None
        if want:  # the model's own distribution, before penalties and masks
            rows = logits if len(want) == len(seqs) else logits[want]
            raw_lp = torch.log_softmax(rows, dim=-1)
        params = [s.params for s in seqs]
        blocked = [i for i, s in enumerate(seqs) if s.num_output_tokens < s.params.min_tokens]
        constrained = any(s.matcher is not None for s in seqs)
        if keep_input and (blocked or constrained or any(
                p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty
                for p in params)):
            logits = logits.clone()
        apply_penalties(logits, seqs)
        if blocked:
            block_stop_tokens(logits, seqs, self.eos_token_ids)
        if constrained:
            self.structured.apply_masks(logits, [s.matcher for s in seqs], blocked)
        tokens, bad = sample(logits, seqs, self._rng)
        bad.update(too_many)
        lps: list[Logprobs | None] = [None] * len(seqs)
        if want:
            chosen = [max(tokens[j], 0) for j in want]  # a bad row's -1: any id, dropped
            for j, d in zip(want, batch_top_logprobs(raw_lp, chosen,
                                                     [params[j].logprobs for j in want])):
                lps[j] = d
        return tokens, lps, bad

    def _advance_matcher(self, seq: Sequence, tok: int) -> None:
        if not seq.matcher.accept_token(tok):  # cannot happen under the mask; stop, never emit junk
            seq.finish_reason, seq.stop_reason = "error", tok
        elif seq.matcher.is_terminated():  # the grammar is complete and took its end token
            seq.finish_reason = "stop"
            if tok not in self.eos_token_ids:
                seq.stop_reason = tok

    def _check_finish(self, seq: Sequence, tok: int) -> None:
        if tok in seq.end_ids:  # EOS (unless ignore_eos) or a stop token id
            p = seq.params
            if tok in self.eos_token_ids and not p.ignore_eos:
                seq.finish_reason = "stop"
            else:
                seq.finish_reason, seq.stop_reason = "stop", tok
        if seq.detok is not None:
            delta = seq.detok.step(seq.token_ids, final=seq.finish_reason is not None)
            if not seq.params.stop:
                seq.text += delta
            elif check_stop_strings(seq, delta):
                seq.finish_reason = "stop"
        if seq.finish_reason is None:
            if len(seq.token_ids) < seq.max_num_tokens:
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
        return self._output(req)

    def _output(self, req: Request, finished: bool | None = None) -> RequestOutput:
        """The request's output now: per sample, what is new since its last output, and the
        whole history as views (nothing is copied here; see CompletionOutput.view)."""
        outputs = []
        for seq in req.seqs:
            end = len(seq.text) if not seq.params.stop else streamable_text_end(seq)
            ntok = len(seq.token_ids)
            outputs.append(CompletionOutput.view(
                seq.index, seq.text, end, seq.token_ids, seq.num_prompt_tokens, ntok,
                seq.logprobs if seq.params.logprobs is not None else None,
                seq.num_tokens_sent, seq.num_text_sent, seq.finish_reason, seq.stop_reason))
            seq.num_text_sent, seq.num_tokens_sent = end, ntok - seq.num_prompt_tokens
        if finished is None:
            finished = req.finished
        if finished and req.metrics.finished_time is None:
            req.metrics.finished_time = time.time()
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outputs, finished,
                             self._prompt_logprobs(req, finished), req.metrics, req.error,
                             req.error_by_request)

    @staticmethod
    def _prompt_logprobs(req: Request, finished: bool) -> list | None:
        if req.params.prompt_logprobs is None:
            return None
        if req.prompt_logprobs_out is not None:
            return req.prompt_logprobs_out  # complete: every output shares the one list
        first = req.seqs[0]
        if len(first.prompt_logprobs) >= first.num_prompt_tokens - 1:
            req.prompt_logprobs_out = [None] + list(first.prompt_logprobs)
            return req.prompt_logprobs_out
        return [None] + list(first.prompt_logprobs) if finished else None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _rows_by_request(seqs: list[Sequence]) -> list[tuple[str, list[int]]]:
    """[(request id, its rows)] in order of first appearance (n > 1 requests have several)."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s.request_id, []).append(i)
    return list(groups.items())


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



def resolve_engine_source(config: EngineConfig):
    """(ModelSource with dense weights, LlamaConfig) as a tensor-parallel rank loads them."""
    from corral.loading import load_config, parse_rope_scaling, resolve_source

    src = resolve_source(config.model, config.revision, weights=True)
    rope = config.rope_scaling
    if isinstance(rope, str):
        rope = parse_rope_scaling(rope)
    return src, load_config(src, rope)


def engine_max_len(config: EngineConfig, model_config) -> int:
    """The context length the model is built for (before the KV cache bounds it)."""
    from corral.model.llama import context_length

    limit = context_length(model_config)
    return min(config.max_model_len or limit, limit)
